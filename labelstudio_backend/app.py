"""The Flask app speaking Label Studio's ML-backend protocol.

Routes: ``GET /`` and ``/health``, ``POST /setup``, ``POST /predict``, ``POST /train``, ``POST /webhook``,
``GET /versions``, ``GET /metrics``, ``GET /openapi.json`` (their description, ``openapi.json`` beside
this module). Every failure is a JSON ``{"error": message}`` response.
"""

from __future__ import annotations

import hmac
import logging
import threading
from pathlib import Path

from .errors import BackendError
from .payload import json_object, objects, project_id, text

log = logging.getLogger(__name__)
MODEL_CLASS = "INSID3"
OPENAPI = Path(__file__).with_name("openapi.json")


BUSY_RETRY_AFTER = 5
WORK_ROUTES = frozenset({"/setup", "/predict", "/train", "/webhook"})


def create_app(backend, busy_limit: int | None = None):
    """A Flask app serving ``backend`` (a :class:`labelstudio_backend.service.Backend`).

    ``busy_limit`` caps the requests of ``WORK_ROUTES`` served at once (the server's threads
    less one, so ``/health`` always finds a thread); one more is answered 503 with ``Retry-After``.
    """
    from flask import Flask, g, jsonify, request
    from werkzeug.exceptions import HTTPException

    app = Flask("insid3-labelstudio")
    app.config["MAX_CONTENT_LENGTH"] = backend.settings.max_request_bytes
    slots = threading.BoundedSemaphore(busy_limit) if busy_limit else None

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

    @app.before_request
    def take_a_work_slot():
        if slots is None or request.path not in WORK_ROUTES:
            return None
        if not slots.acquire(blocking=False):
            raise BackendError(f"insid3 is busy with {busy_limit} requests; retry in {BUSY_RETRY_AFTER} s", 503,
                               retry_after=BUSY_RETRY_AFTER)
        g.work_slot = True
        return None

    @app.teardown_request
    def give_back_the_work_slot(_error):
        if g.pop("work_slot", False):
            slots.release()

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
        response = jsonify(error=err.description)
        response.status_code = err.code
        for name, value in err.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value  # Allow on a 405
        return response

    @app.errorhandler(Exception)
    def unexpected_error(err: Exception):
        log.exception("%s %s failed", request.method, request.path)
        return jsonify(error=f"insid3 backend failed ({type(err).__name__}); its log has the details"), 500

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify(status="UP", model_class=MODEL_CLASS, preparing=backend.warmups.running())

    @app.post("/setup")
    def setup():
        payload = json_body()
        version = backend.setup(project_id(payload.get("project")), text(payload, "schema", "label_config"))
        return jsonify(model_version=version)

    @app.post("/predict")
    def predict():
        payload = json_body()
        tasks = objects(payload, "tasks")
        project, label_config = project_id(payload.get("project")), text(payload, "label_config")
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
        version = backend.train(project_id(payload.get("project")), text(payload, "label_config"),
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

    @app.get("/openapi.json")
    def openapi():
        return app.response_class(OPENAPI.read_bytes(), mimetype="application/json")

    def json_body() -> dict:
        return json_object(request.get_data(cache=False))

    return app

