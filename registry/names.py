"""Model names: Ollama's `[scheme://][host/][namespace/]model[:tag]` grammar.

Parse at the edge, pass `ModelName` inside. A valid name can never traverse directories: `/`,
`\\` and a leading `.` are impossible in every part, which is what makes names safe as keys.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
DEFAULT_SCHEME = "https"

# Marks a part whose separator was present but whose side was empty ("a:" or "/m").
# It contains '!' so it can never validate.
_MISSING = "!MISSING!"

_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


@dataclass(frozen=True)
class _PartRule:
    label: str
    max_length: int
    extra_chars: frozenset[str]

    def problem(self, value: str) -> str | None:
        """Return why `value` breaks this rule, or None when it is fine."""
        if value == _MISSING or not value:
            return f"the {self.label} is empty"
        if len(value) > self.max_length:
            return f"the {self.label} is longer than {self.max_length} characters"
        if value[0] not in _ALNUM and value[0] != "_":
            return f"the {self.label} must start with a letter, digit or '_' (got {value[0]!r})"
        allowed = _ALNUM | self.extra_chars
        for ch in value[1:]:
            if ch not in allowed:
                shown = " ".join(sorted(self.extra_chars))
                return f"the {self.label} may only contain letters, digits and {shown} (got {ch!r})"
        return None


_HOST = _PartRule("host", 350, frozenset("_-.:"))
_NAMESPACE = _PartRule("namespace", 80, frozenset("_-"))
_MODEL = _PartRule("model", 80, frozenset("_-."))
_TAG = _PartRule("tag", 80, frozenset("_-."))


@dataclass(frozen=True)
class ModelName:
    """A fully qualified model name. Build one with `ModelName.parse`."""

    host: str
    namespace: str
    model: str
    tag: str
    scheme: str = DEFAULT_SCHEME

    @classmethod
    def parse(cls, text: str) -> "ModelName":
        """Parse and validate `text`, filling defaults; raise InvalidName naming the broken rule."""
        from berth.registry.errors import InvalidName

        if not isinstance(text, str) or not text.strip():
            raise InvalidName("invalid model name: the name is empty")
        host, namespace, model, tag, scheme = _split(text.strip())
        name = cls(
            host=host or DEFAULT_HOST,
            namespace=namespace or DEFAULT_NAMESPACE,
            model=model,
            tag=tag or DEFAULT_TAG,
            scheme=scheme or DEFAULT_SCHEME,
        )
        problem = name.problem()
        if problem:
            raise InvalidName(f"invalid model name {text!r}: {problem}")
        return name

    def problem(self) -> str | None:
        for rule, value in ((_HOST, self.host), (_NAMESPACE, self.namespace), (_MODEL, self.model), (_TAG, self.tag)):
            reason = rule.problem(value)
            if reason:
                return reason
        return None

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def display(self) -> str:
        """Ollama's shortest display form: default host and `library` dropped, tag always kept."""
        if self.host.lower() == DEFAULT_HOST:
            if self.namespace.lower() == DEFAULT_NAMESPACE:
                return f"{self.model}:{self.tag}"
            return f"{self.namespace}/{self.model}:{self.tag}"
        return str(self)

    @property
    def repository(self) -> str:
        """`namespace/model`, the repository path used in registry URLs."""
        return f"{self.namespace}/{self.model}"

    @property
    def key(self) -> str:
        """Case-folded identity: names that differ only in case are the same model."""
        return str(self).lower()

    def canonical(self, existing: Iterable["ModelName"]) -> "ModelName":
        """Adopt the stored spelling of each part that matches an existing name case-insensitively.

        Mirrors Ollama's `getExistingName`: `LLaMA3` resolves to an existing `llama3`.
        """
        names = list(existing)
        for other in names:
            if other.key == self.key:
                return other
        host, namespace, model, tag = self.host, self.namespace, self.model, self.tag
        for other in names:
            if other.host.lower() == host.lower():
                host = other.host
            if other.namespace.lower() == namespace.lower():
                namespace = other.namespace
            if other.model.lower() == model.lower():
                model = other.model
            if other.tag.lower() == tag.lower():
                tag = other.tag
        return replace(self, host=host, namespace=namespace, model=model, tag=tag)


def _split(text: str) -> tuple[str, str, str, str, str]:
    """Split into (host, namespace, model, tag, scheme) exactly as Ollama's ParseNameBare does."""
    host = namespace = tag = scheme = ""
    rest = text
    colon, slash = rest.rfind(":"), rest.rfind("/")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :] or _MISSING
    slash = rest.rfind("/")
    if slash < 0:
        return host, namespace, rest or _MISSING, tag, scheme
    rest, model = rest[:slash], rest[slash + 1 :] or _MISSING
    slash = rest.rfind("/")
    if slash < 0:
        return host, rest or _MISSING, model, tag, scheme
    host, namespace = rest[:slash] or _MISSING, rest[slash + 1 :] or _MISSING
    if "://" in host:
        scheme, host = host.split("://", 1)
        host = host or _MISSING
    return host, namespace, model, tag, scheme
