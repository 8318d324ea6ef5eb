"""The Flask app speaking Label Studio's ML-backend protocol.

Routes: ``GET /`` and ``/health``, ``POST /setup``, ``POST /predict``, ``POST /train``, ``POST /webhook``,
``GET /versions``, ``GET /metrics``. Every failure is a JSON ``{"error": message}`` response.
"""

from __future__ import annotations

import hmac
import logging

from .errors import BackendError

log = logging.getLogger(__name__)
MODEL_CLASS = "INSID3"


def create_app(backend):
    """A Flask app serving ``backend`` (a :class:`labelstudio_backend.service.Backend`)."""
    from flask import Flask, jsonify, request
    from werkzeug.exceptions import HTTPException

    app = Flask("insid3-labelstudio")

    @app.before_request
    def check_basic_auth():
        expected = backend.settings.basic_auth
        if expected is None:
            return None
        given = request.authorization
        if (
            given is None
            or not hmac.compare_digest((given.username or "").encode(), expected[0].encode())
            or not hmac.compare_digest((given.password or "").encode(), expected[1].encode())
        ):
            response = jsonify(error="authentication required (BASIC_AUTH_USER / BASIC_AUTH_PASS)")
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Basic realm="insid3"'
            return response
        return None

    @app.errorhandler(BackendError)
    def backend_error(err: BackendError):
        log.warning("%s %s: %s", request.method, request.path, err.message)
        response = jsonify(error=err.message)
        response.status_code = err.status
        if err.retry_after is not None:
            response.headers["Retry-After"] = str(err.retry_after)
        return response

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        return jsonify(error=err.description), err.code

    @app.errorhandler(Exception)
    def unexpected_error(err: Exception):
        log.exception("%s %s failed", request.method, request.path)
        return jsonify(error=f"insid3 backend failed: {type(err).__name__}: {err}"), 500

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify(status="UP", model_class=MODEL_CLASS, preparing=backend.warmups.running())

    @app.post("/setup")
    def setup():
        payload = json_body()
        version = backend.setup(project_id(payload.get("project")), payload.get("schema") or payload.get("label_config") or "")
        return jsonify(model_version=version)

    @app.post("/predict")
    def predict():
        payload = json_body()
        tasks = objects(payload, "tasks")
        project, label_config = project_id(payload.get("project")), payload.get("label_config") or ""
        if len(tasks) > backend.settings.max_tasks_per_request:
            return one_by_one(backend.setup(project, label_config))
        predictions, version = backend.predict(tasks, project, label_config, backend.settings.warmup_wait)
        failures = [item for item in predictions if isinstance(item, BackendError)]
        if failures and len(failures) == len(predictions):
            raise failures[0]
        if failures:
            return one_by_one(version)
        return jsonify(results=predictions, model_version=version)

    def one_by_one(version: str):
        """One result for several tasks: Label Studio then asks again task by task, each request
        with its own timeout, and a task that fails gets its own error without losing the others."""
        return jsonify(results=[{"result": [], "score": 0.0, "model_version": version}], model_version=version)

    @app.post("/train")
    def train():
        payload = json_body()
        version = backend.train(project_id(payload.get("project")), payload.get("label_config") or "",
                                objects(payload, "annotations", required=False), backend.settings.warmup_wait)
        return jsonify(model_version=version)

    @app.post("/webhook")
    def webhook():
        return jsonify(backend.webhook(json_body()))

    @app.get("/versions")
    def versions():
        return jsonify(versions=[backend.model_version(project_id(request.args.get("project")))])

    @app.get("/metrics")
    def metrics():
        return jsonify({})

    def json_body() -> dict:
        payload = request.get_json(silent=True)
        if not isinstance(payload, dict):
            raise BackendError("request body must be a JSON object")
        return payload

    return app


def objects(payload: dict, key: str, required: bool = True) -> list[dict]:
    """``payload[key]`` checked to be a list of JSON objects (an empty list when absent and not ``required``)."""
    value = payload.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise BackendError(f"request field {key!r} must be a list of objects")
    return value


def project_id(value) -> int | None:
    """Project id from Label Studio's ``"<id>.<timestamp>"``, a number, or ``None``."""
    if value in (None, ""):
        return None
    head = str(value).split(".")[0]
    if isinstance(value, bool) or not head.isdigit():
        raise BackendError(f"project {value!r} is not a project id")
    return int(head)
