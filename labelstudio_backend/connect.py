"""Connect the backend to a project: its ML-backend connection and its webhook, idempotently."""

from __future__ import annotations

import base64
from dataclasses import dataclass

WEBHOOK_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED")
TITLE = "insid3"


@dataclass(frozen=True)
class Connection:
    """What :func:`connect` found or made.

    Attributes
    ----------
    ml_backend : int
        Id of the project's ML-backend connection to the backend.
    ml_backend_created : bool
    webhook : int
        Id of the project's webhook to ``<backend>/webhook``.
    webhook_created : bool
    duplicates_removed : int
        Other connections or webhooks to the same URL that were deleted.
    """

    ml_backend: int
    ml_backend_created: bool
    webhook: int
    webhook_created: bool
    duplicates_removed: int


def basic_auth_header(basic_auth: tuple[str, str] | None) -> dict[str, str]:
    """``{"Authorization": "Basic ..."}`` for ``(user, password)``, ``{}`` for ``None``."""
    if basic_auth is None:
        return {}
    token = base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def connect(api, project: int, backend_url: str, basic_auth: tuple[str, str] | None = None) -> Connection:
    """Make ``project`` use the backend at ``backend_url`` and send it annotation events.

    Reuses (and updates) an existing connection and webhook to the same URL and deletes any
    duplicate of them, so running it again changes nothing. Label Studio checks the backend's
    ``/health`` and ``/setup`` while connecting, so the backend must be up.

    Parameters
    ----------
    api : labelstudio_backend.api.LabelStudioApi
    project : int
    backend_url : str
        The backend's address as Label Studio reaches it.
    basic_auth : tuple of (str, str) or None
        ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS`` of the backend, given to the connection and
        sent by the webhook as an ``Authorization`` header.
    """
    url = backend_url.rstrip("/")
    client, what = api.client, f"project {project}"
    auth = ({"auth_method": "BASIC_AUTH", "basic_auth_user": basic_auth[0], "basic_auth_pass": basic_auth[1]}
            if basic_auth else {"auth_method": "NONE"})

    backends = [b for b in api.call(lambda: client.ml.list(project=project), what) if b.url.rstrip("/") == url]
    if backends:
        ml_backend = backends[0].id
        api.call(lambda: client.ml.update(ml_backend, project=project, url=url, **auth), what)
    else:
        ml_backend = api.call(lambda: client.ml.create(project=project, url=url, title=TITLE, is_interactive=False,
                                                       **auth), what).id
    for duplicate in backends[1:]:
        api.call(lambda: client.ml.delete(duplicate.id), what)

    # connecting makes Label Studio add a webhook to <url>/webhook for all actions: it is narrowed here
    hook_url = f"{url}/webhook"
    hooks = [h for h in api.call(lambda: client.webhooks.list(project=str(project)), what)
             if h.url.rstrip("/") == hook_url and h.project == project]
    settings = {"url": hook_url, "actions": list(WEBHOOK_ACTIONS), "headers": basic_auth_header(basic_auth),
                "send_payload": True, "send_for_all_actions": False, "is_active": True}
    if hooks:
        webhook = hooks[0].id
        api.call(lambda: client.webhooks.update(webhook, **settings), what)
    else:
        webhook = api.call(lambda: client.webhooks.create(project=project, **settings), what).id
    for duplicate in hooks[1:]:
        api.call(lambda: client.webhooks.delete(duplicate.id), what)
    return Connection(ml_backend, not backends, webhook, not hooks, len(backends[1:]) + len(hooks[1:]))
