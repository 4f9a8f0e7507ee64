"""Which models must be signed, and by whom: `BERTH_TRUST_POLICY`, checked on pull before tagging.

The policy is JSON, given inline or as the path of a file:

    {"default": "off",
     "rules": [{"scope": "registry.example.com/team/", "mode": "enforce",
                "keys": ["ssh-ed25519 AAAAC3Nza… alice", "-----BEGIN PUBLIC KEY-----…"]},
               {"scope": "registry.example.com", "mode": "warn", "keys": [...]}]}

A rule's `scope` is a prefix of `host[:port]/repository`, matched at a `/` boundary or whole (so
`reg/team` covers `reg/team/model` but not `reg/teamx/model`); the longest matching scope wins, and
`default` (off unless set) applies where none does. Modes, as in Notation and Ollama's signing PR:

* `off`: no check;
* `warn`: pulls anyway, with a `warning: …` progress status when no trusted signature is found;
* `enforce`: refuses, before any blob is downloaded or any tag written, unless the manifest has a
  valid signature by one of the rule's keys (registry/signing.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from berth.registry.digest import Digest
from berth.registry.errors import InvalidInput
from berth.registry.oci import Repository
from berth.registry.signing import SignatureCheck, Signatures, parse_public_key

MAX_POLICY_BYTES = 1024 * 1024


class TrustMode(str, Enum):
    OFF = "off"
    WARN = "warn"
    ENFORCE = "enforce"


@dataclass(frozen=True)
class TrustRule:
    scope: str
    mode: TrustMode
    keys: tuple[Ed25519PublicKey, ...] = ()

    def covers(self, target: str) -> bool:
        return target == self.scope or target.startswith(self.scope.rstrip("/") + "/")


@dataclass(frozen=True)
class TrustPolicy:
    default: TrustMode = TrustMode.OFF
    rules: tuple[TrustRule, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "TrustPolicy":
        text = (env.get("BERTH_TRUST_POLICY") or "").strip()
        if not text:
            return cls()
        if not text.startswith("{"):
            path = Path(text).expanduser()
            try:
                with open(path, "rb") as handle:
                    raw = handle.read(MAX_POLICY_BYTES + 1)
            except OSError as exc:
                raise InvalidInput(f"cannot read BERTH_TRUST_POLICY file {path}: {exc.strerror}") from None
            if len(raw) > MAX_POLICY_BYTES:
                raise InvalidInput(f"BERTH_TRUST_POLICY file {path} is larger than {MAX_POLICY_BYTES} bytes")
            text = raw.decode("utf-8", errors="replace")
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise InvalidInput(f"BERTH_TRUST_POLICY is not valid JSON: {exc}") from None
        return cls.parse(doc)

    @classmethod
    def parse(cls, doc: Any) -> "TrustPolicy":
        if not isinstance(doc, dict) or not isinstance(doc.get("rules", []), list):
            raise InvalidInput('a trust policy is {"default": mode, "rules": [{"scope", "mode", "keys"}]}')
        rules = []
        for item in doc.get("rules", []):
            if not isinstance(item, dict) or not isinstance(item.get("scope"), str) or not item["scope"].strip():
                raise InvalidInput(f"trust policy rule {item!r} needs a non-empty \"scope\"")
            keys = item.get("keys", [])
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise InvalidInput(f"trust policy rule for {item['scope']!r}: \"keys\" must be a list of strings")
            mode = _mode(item.get("mode", "enforce"))
            if mode is TrustMode.ENFORCE and not keys:
                raise InvalidInput(f"trust policy rule for {item['scope']!r} enforces signatures but trusts no key")
            rules.append(TrustRule(_canonical(item["scope"].strip()), mode, tuple(parse_public_key(k) for k in keys)))
        return cls(_mode(doc.get("default", "off")), tuple(rules))

    def rule_for(self, host: str, repository: str) -> TrustRule:
        target = _canonical(f"{host}/{repository}")
        matching = [rule for rule in self.rules if rule.covers(target)]
        if not matching:
            return TrustRule("", self.default)
        return max(matching, key=lambda rule: len(rule.scope))


def _canonical(scope: str) -> str:
    """`host[/path]` as one registry is named however it was written: lower case, without a
    trailing dot or `:443` (https's own port), so `reg.io:443/team` cannot slip past a rule for
    `reg.io`."""
    host, slash, rest = scope.lower().partition("/")
    host = host.removesuffix(":443").rstrip(".")
    return host + slash + rest


def _mode(value: object) -> TrustMode:
    try:
        return TrustMode(str(value).lower())
    except ValueError:
        raise InvalidInput(f"trust mode {value!r} is not one of off, warn, enforce") from None


class UntrustedModel(InvalidInput):
    """The trust policy enforces signatures and this model has no valid one by a trusted key."""


@dataclass(frozen=True)
class TrustDecision:
    rule: TrustRule
    check: SignatureCheck | None  # None when the rule is off

    @property
    def message(self) -> str:
        if self.check is None:
            return "signature check is off for this registry"
        if self.check.verified:
            return f"signed by trusted key {', '.join(k.split()[1][:16] + '…' for k in self.check.trusted_by)}"
        if self.check.found:
            return (f"{self.check.digest} has {self.check.found} signature(s), none valid for a key the trust "
                    f"policy trusts for {self.rule.scope or 'this registry'}")
        return f"{self.check.digest} is not signed"


def decide(signatures: Signatures, policy: TrustPolicy, repo: Repository, digest: Digest) -> TrustDecision:
    """Check `digest` against the rule that covers `repo`; raising is left to the caller."""
    rule = policy.rule_for(repo.host, repo.path)
    if rule.mode is TrustMode.OFF:
        return TrustDecision(rule, None)
    return TrustDecision(rule, signatures.check(repo, digest, list(rule.keys)))
