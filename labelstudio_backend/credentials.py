"""Authorization headers for Label Studio: legacy tokens and personal access tokens (JWT)."""

from __future__ import annotations

import threading

import requests

from .errors import BackendError


def is_personal_access_token(api_key: str) -> bool:
    """``True`` for a personal access token, a JWT refresh token (three dot-separated parts)."""
    return api_key.startswith("eyJ") and api_key.count(".") == 2


class Credentials:
    """Headers authenticating as ``api_key``, exchanging a personal access token when needed.

    Parameters
    ----------
    base_url : str
        Label Studio's address.
    api_key : str
        Legacy token (sent as ``Token``) or personal access token, exchanged at
        ``/api/token/refresh/`` for a short-lived access token (sent as ``Bearer``).
    """

    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self._access: str | None = None
        self._lock = threading.Lock()

    def headers(self, refresh: bool = False) -> dict[str, str]:
        """The ``Authorization`` header; ``refresh`` fetches a new access token first."""
        if not self.api_key:
            return {}
        if not is_personal_access_token(self.api_key):
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if refresh or self._access is None:
                self._access = self._exchange()
            return {"Authorization": f"Bearer {self._access}"}

    def _exchange(self) -> str:
        try:
            response = requests.post(f"{self.base_url}/api/token/refresh/", json={"refresh": self.api_key}, timeout=30)
        except requests.RequestException as err:
            raise BackendError(f"cannot reach Label Studio at {self.base_url}: {err}", 502) from err
        if response.status_code != 200:
            raise BackendError(
                f"Label Studio refused LABEL_STUDIO_API_KEY ({response.status_code} at /api/token/refresh/)", 502
            )
        try:
            return response.json()["access"]
        except (ValueError, KeyError, TypeError) as err:
            raise BackendError(f"Label Studio's /api/token/refresh/ answered without an access token ({err})", 502) from err
