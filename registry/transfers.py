"""The app's registry side: one client, shared downloads, the puller and pusher, and signing keys.

Built from the environment once (proxies, CA bundle, rate cap, trust policy, signing key), on the
first pull or push rather than at start-up (a TLS context and its CA bundle cost ~40 ms).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from berth.registry.credentials import CredentialStore, berth_home
from berth.registry.library import Library
from berth.registry.network import NetworkSettings
from berth.registry.oci import RegistryClient
from berth.registry.ollama_auth import OllamaKeySigner
from berth.registry.pull import Puller, SharedDownloads
from berth.registry.push import Pusher
from berth.registry.rate import RateLimiter
from berth.registry.trust import TrustPolicy
from berth.registry.user_key import KeyHolder, UserKey, load_key


@dataclass
class Transfers:
    client: RegistryClient
    downloads: SharedDownloads
    puller: Puller
    pusher: Pusher
    keys: KeyHolder  # the user's key ($BERTH_HOME/id_ed25519): registry auth, and `sign` by default
    signing_key: Path | None = None  # BERTH_SIGNING_KEY: every push is signed with it unless told not to

    @classmethod
    def from_env(cls, library: Library, signing_key: Path | None,
                 env: Mapping[str, str] | None = None) -> "Transfers":
        """`signing_key`: Settings' BERTH_SIGNING_KEY, already checked when the server started."""
        env = os.environ if env is None else env
        network = NetworkSettings.from_env(env)
        signer = OllamaKeySigner(berth_home(env))
        client = RegistryClient(CredentialStore(), network=network, signer=signer)
        downloads = SharedDownloads()
        rate_limit = RateLimiter(network.max_download_rate) if network.max_download_rate else None
        puller = Puller(library, client, downloads, rate_limit=rate_limit, trust=TrustPolicy.from_env(env))
        return cls(client, downloads, puller, Pusher(library, client), signer.keys, signing_key)

    def key_for_push(self, sign: bool | None) -> UserKey | None:
        """The key a push signs with: `sign` false never signs; true signs with the configured
        signing key, else the user's own; absent signs only when BERTH_SIGNING_KEY is set."""
        if sign is False or (sign is None and self.signing_key is None):
            return None
        return load_key(self.signing_key) if self.signing_key is not None else self.keys.get()

    def close(self) -> None:
        self.client.close()
