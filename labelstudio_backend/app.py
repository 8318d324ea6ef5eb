"""The Flask app speaking Label Studio's ML-backend protocol.

Routes: ``GET /`` and ``/health``, ``POST /setup``, ``POST /predict``, ``POST /train``, ``POST /webhook``,
``GET /versions``, ``GET /metrics``, ``GET /openapi.json`` (their description, ``openapi.json`` beside
this module). Every failure is a JSON ``{"error": message}`` response.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from insid3_core.settings import out_of_memory_message

from .errors import BackendError, body_too_large
from .interactive import context_regions
from .payload import json_object, objects, optional_object, project_id, text
from .turns import Turns

log = logging.getLogger(__name__)
MODEL_CLASS = "INSID3"
OPENAPI = Path(__file__).with_name("openapi.json")
WORK_ROUTES = frozenset({"/setup", "/predict", "/train", "/webhook"})


def create_app(backend, turns: Turns | None = None):
    """A Flask app serving ``backend`` (a :class:`labelstudio_backend.service.Backend`).

    ``turns`` bounds the requests of ``WORK_ROUTES`` served and waiting at once (see
    :mod:`labelstudio_backend.turns`); ``None``: no bound.
    """
    from flask import Flask, g, jsonify, request
    from werkzeug.exceptions import HTTPException

    app = Flask("insid3-labelstudio")
    app.config["MAX_CONTENT_LENGTH"] = backend.settings.max_request_bytes

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
    def take_a_turn():
        if turns is None or request.path not in WORK_ROUTES:
            return None
        turns.take()
        g.turn = True
        return None

    @app.teardown_request
    def give_back_the_turn(_error):
        if g.pop("turn", False):
            turns.give_back()

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
        limit = app.config["MAX_CONTENT_LENGTH"]
        message = body_too_large(limit) if err.code == 413 and (request.content_length or 0) > limit else err.description
        response = jsonify(error=message)
        response.status_code = err.code
        for name, value in err.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value  # Allow on a 405
        return response

    @app.errorhandler(Exception)
    def unexpected_error(err: Exception):
        log.exception("%s %s failed", request.method, request.path)
        if message := out_of_memory_message(err):  # the settings are the operator's to change: no Retry-After
            return jsonify(error=message), 503
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
        drawn = context_regions((optional_object(payload, "params") or {}).get("context"))
        if drawn:  # interactive pre-annotation: the annotator drew on this task
            if len(tasks) != 1:
                raise BackendError(f"an interactive request (params.context) is for one task, got {len(tasks)}")
            found, version = backend.predict_interactive(tasks[0], project, label_config, drawn)
            return jsonify(results=[found], model_version=version)
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
        tasks = None if payload.get("annotations") is None else objects(payload, "annotations")
        version = backend.train(project_id(payload.get("project")), text(payload, "label_config"), tasks,
                                backend.settings.warmup_wait)
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

