"""``insid3 labelstudio serve|connect|preannotate``: the parser the entry point registers, and a real server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("flask")
pytest.importorskip("label_studio_sdk")

import requests  # noqa: E402
from data import ROOT  # noqa: E402
from labelstudio_fixtures import insid3_parser  # noqa: E402

from insid3_core.cli import main  # noqa: E402
from labelstudio_live import free_port  # noqa: E402

from labelstudio_backend.commands import run_connect, run_preannotate, run_serve  # noqa: E402


def test_serve_arguments():
    arguments = insid3_parser().parse_args(["labelstudio", "serve", "--host", "0.0.0.0", "--port", "9191", "--image-size", "256"])
    assert (arguments.host, arguments.port, arguments.image_size) == ("0.0.0.0", 9191, 256)
    assert arguments.handler is run_serve
    defaults = insid3_parser().parse_args(["labelstudio", "serve"])
    assert (defaults.host, defaults.port, defaults.threads) == ("127.0.0.1", 9090, 8)


def test_quality_thresholds_from_arguments_and_environment(monkeypatch):
    from insid3_core.settings import EngineSettings

    monkeypatch.setenv("INSID3_MAX_COMPONENTS", "2")
    arguments = insid3_parser().parse_args(["labelstudio", "serve", "--min-area-ratio", "0.05"])
    engine = EngineSettings.from_arguments(arguments)
    assert (engine.min_area_ratio, engine.max_area_ratio, engine.max_components) == (0.05, 0.9, 2)


def test_connect_arguments(monkeypatch, capsys):
    arguments = insid3_parser().parse_args(
        ["labelstudio", "connect", "--project", "4", "--backend-url", "http://10.0.0.2:9090"])
    assert (arguments.project, arguments.backend_url, arguments.handler) == (4, "http://10.0.0.2:9090", run_connect)
    with pytest.raises(SystemExit):
        insid3_parser().parse_args(["labelstudio", "connect", "--project", "4"])
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    assert main(["labelstudio", "connect", "--project", "4", "--backend-url", "http://10.0.0.2:9090"]) == 2
    assert "insid3: error: connect needs LABEL_STUDIO_URL" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, environment, words", [
    (["serve", "--port", "99999"], {}, "--port must be from 1 to 65535, got 99999"),
    (["serve", "--threads", "99999999999999999999"], {}, "--threads must be from 1 to 1024"),
    (["serve", "--host", "no-such-host.invalid."], {}, "--host 'no-such-host.invalid.' is not an address"),
    (["serve", "--host", "127.0.0.1", "--port", "{busy}"], {}, "--port {busy}: cannot listen there (Address already in use)"),
    (["serve", "--host", "192.0.2.1"], {}, "--host 192.0.2.1 --port 9090: cannot listen there (Cannot assign requested address)"),
    (["serve"], {"MODEL_DIR": "{file}"}, "is a file, not a folder"),
    (["serve"], {"INSID3_MAX_QUEUED_REQUESTS": "99999999"}, "INSID3_MAX_QUEUED_REQUESTS must be from 0 to 10000"),
    (["serve"], {"LABEL_STUDIO_URL": "ftp://ls.local"}, "LABEL_STUDIO_URL='ftp://ls.local' scheme 'ftp' is not http"),
    (["serve"], {"INSID3_ALLOWED_HOSTS": "images.example.org,[zz"}, "INSID3_ALLOWED_HOSTS: the entry '[zz' has a malformed host and port '[zz'"),
    (["connect", "--project", "4", "--backend-url", "ftp://10.0.0.2"], {}, "--backend-url 'ftp://10.0.0.2'"),
    (["connect", "--project", "-1", "--backend-url", "http://10.0.0.2:9090"], {}, "--project must be"),
    (["connect", "--project", "4", "--backend-url", "http://10.0.0.2:9090"],
     {"LABEL_STUDIO_URL": "http://[::1", "LABEL_STUDIO_API_KEY": "k"}, "LABEL_STUDIO_URL='http://[::1'"),
])
def test_bad_command_arguments_are_named_before_the_model_loads(monkeypatch, tmp_path, capsys, arguments,
                                                                environment, words):
    import insid3_core.settings

    monkeypatch.setattr(insid3_core.settings.EngineSettings, "build", lambda *_: pytest.fail("the model loaded"))
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    for name, value in environment.items():
        monkeypatch.setenv(name, value.format(file=tmp_path / "a-file"))
    with socket.create_server(("127.0.0.1", 0)) as busy:  # a port another program listens on
        port = str(busy.getsockname()[1])
        assert main(["labelstudio", *(argument.format(busy=port) for argument in arguments)]) == 2
    err = capsys.readouterr().err
    assert words.format(busy=port) in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["connect", "--backend-url", "http://127.0.0.1:9090"], ["preannotate"]])
def test_a_label_studio_that_does_not_answer_exits_2_naming_it_before_the_model_loads(monkeypatch, capsys,
                                                                                      command):
    import insid3_core.settings

    monkeypatch.setattr(insid3_core.settings.EngineSettings, "build", lambda *_: pytest.fail("the model loaded"))
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]  # nothing listens there once closed
    monkeypatch.setenv("LABEL_STUDIO_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "0123456789abcdef")
    assert main(["labelstudio", *command, "--project", "4"]) == 2
    err = capsys.readouterr().err
    assert f"insid3: error: cannot reach Label Studio at http://127.0.0.1:{port}" in err and "Traceback" not in err


@pytest.mark.parametrize("host, basic_auth, warned", [
    ("0.0.0.0", False, True), ("::", False, True), ("0.0.0.0", True, False), ("127.0.0.1", False, False),
    ("localhost", False, False), ("::1", False, False),
])
def test_serving_beyond_loopback_without_basic_auth_is_warned_of_before_the_model_loads(
        monkeypatch, tmp_path, capsys, host, basic_auth, warned):
    import insid3_core.settings

    if ":" in host and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    monkeypatch.setattr(insid3_core.settings.EngineSettings, "build", lambda *_: pytest.fail("the model loads"))
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    if basic_auth:
        monkeypatch.setenv("BASIC_AUTH_USER", "lead")
        monkeypatch.setenv("BASIC_AUTH_PASS", "s3cret")
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(pytest.fail.Exception, match="the model loads"):
        main(["labelstudio", "serve", "--host", host, "--port", str(port)])
    err = capsys.readouterr().err
    assert (f"insid3: warning: --host {host} without BASIC_AUTH_USER and BASIC_AUTH_PASS" in err) == warned, err


def test_a_port_taken_while_the_model_loads_is_named_not_a_traceback(monkeypatch, tmp_path, capsys):
    import labelstudio_backend.commands as commands

    monkeypatch.setattr(commands, "check_address", lambda host, port: None)  # taken after the check
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["labelstudio", "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                     "--image-size", "128", "--svd-components", "16"]) == 2
    err = capsys.readouterr().err
    assert f"--host 127.0.0.1 --port {port}: cannot listen there (Address already in use)" in err
    assert "Traceback" not in err


def test_preannotate_arguments(monkeypatch):
    from insid3_core.settings import EngineSettings

    monkeypatch.setenv("INSID3_IMAGE_SIZE", "128")
    arguments = insid3_parser().parse_args(["labelstudio", "preannotate", "--project", "3"])
    assert (arguments.project, arguments.handler) == (3, run_preannotate)
    assert EngineSettings.from_arguments(arguments).image_size == 128
    with pytest.raises(SystemExit):
        insid3_parser().parse_args(["labelstudio", "preannotate"])


def test_preannotate_without_label_studio_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    assert main(["labelstudio", "preannotate", "--project", "3", "--image-size", "128", "--svd-components", "16",
                 "--device", "cpu"]) == 2
    assert "insid3: error: preannotate needs LABEL_STUDIO_URL" in capsys.readouterr().err


@pytest.mark.parametrize("variables, named", [
    ({"LABEL_STUDIO_API_KEY": "s3cret-token\n"}, "LABEL_STUDIO_API_KEY holds spaces, control"),
    ({"LABEL_STUDIO_API_KEY": "s3cret token"}, "LABEL_STUDIO_API_KEY holds spaces, control"),
    ({"BASIC_AUTH_USER": "lead:s3cret", "BASIC_AUTH_PASS": "pw"}, "BASIC_AUTH_USER must not hold ':'"),
    ({"BASIC_AUTH_USER": "lead", "BASIC_AUTH_PASS": "s3cret\n"}, "BASIC_AUTH_PASS holds control characters"),
    ({"LABEL_STUDIO_URL": "http://admin:s3cret@127.0.0.1:8080"}, "LABEL_STUDIO_URL='http://***@127.0.0.1:8080' holds user"),
])
@pytest.mark.parametrize("command", ["serve", "preannotate"])
def test_a_credential_no_header_can_carry_is_named_and_never_shown(monkeypatch, tmp_path, capsys, variables, named,
                                                                    command):
    """A trailing newline in a token went into the Authorization header and came back in 502
    bodies (Label Studio shows them to its users) and tracebacks; a password in the URL was echoed."""
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:8080")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "token")
    monkeypatch.delenv("BASIC_AUTH_USER", raising=False)
    monkeypatch.delenv("BASIC_AUTH_PASS", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    arguments = ["--project", "3"] if command == "preannotate" else ["--port", str(free_port())]
    assert main(["labelstudio", command, *arguments, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert named in err and "s3cret" not in err and "Traceback" not in err, err


@pytest.mark.live
def test_serve_answers_health(tmp_path):
    """``serve`` runs waitress (threads in one process), not Flask's development server."""
    port = free_port()
    environment = dict(os.environ, MODEL_DIR=str(tmp_path), BASIC_AUTH_USER="", BASIC_AUTH_PASS="")
    process = subprocess.Popen(
        [sys.executable, "-m", "labelstudio_backend", "serve", "--port", str(port), "--image-size", "128",
         "--svd-components", "16", "--device", "cpu"],
        cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        assert answer.json() == {"status": "UP", "model_class": "INSID3", "preparing": []}
        assert answer.headers["Server"] == "insid3"
        output = process_output(process)
        assert f"backend serving on http://127.0.0.1:{port}" in output and "development server" not in output
    finally:
        process.terminate()
        process.wait(timeout=20)


def process_output(process) -> str:
    """What ``process`` wrote to stderr, after stopping it."""
    process.terminate()
    return process.communicate(timeout=20)[1].decode()


def test_preannotate_predicts_with_the_settings_serve_was_started_with(tmp_path, monkeypatch):
    """``preannotate`` without flags gets the model version of the backend ``serve`` started with flags."""
    from labelstudio_backend.commands import backend_from_arguments
    from labelstudio_backend.settings import Settings

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    serving = {"INSID3_INSTANCES": "necks", "INSID3_NEGATIVE_LABEL": "Other", "INSID3_POLYGON_TOLERANCE": "2.5"}
    for name, value in serving.items():
        monkeypatch.setenv(name, value)
    flags = ["--image-size", "128", "--svd-components", "16", "--tau", "0.7", "--device", "cpu"]
    served = backend_from_arguments(insid3_parser().parse_args(["labelstudio", "serve", *flags]),
                                    Settings.from_environment(), serving=True)
    for name in serving:  # preannotate in another shell, without the backend's variables
        monkeypatch.delenv(name)
    plain = backend_from_arguments(insid3_parser().parse_args(["labelstudio", "preannotate", "--project", "1"]),
                                   Settings.from_environment())
    assert plain.model_version(None) == served.model_version(None)
    assert plain.predictor.segmenter.config.tau == 0.7
    assert (plain.predictor.instances, plain.predictor.negative_label, plain.settings.polygon_tolerance) == \
        ("necks", "Other", 2.5)
    changed = backend_from_arguments(
        insid3_parser().parse_args(["labelstudio", "preannotate", "--project", "1", "--tau", "0.6"]),
        Settings.from_environment())
    assert changed.model_version(None) != served.model_version(None)


@pytest.mark.parametrize("served, named", [
    ('{"tau": 5}', "tau"),
    ('{"backend": {"instances": "kmeans"}}', "INSID3_INSTANCES"),
    # of the wrong type: left out before, so preannotate predicted with its own setting instead
    ('{"backend": {"polygon_tolerance": "2.5"}}', "INSID3_POLYGON_TOLERANCE (backend.polygon_tolerance) must be a number"),
    ('{"backend": {"calibrate": "yes"}}', "INSID3_CALIBRATE (backend.calibrate) must be a bool"),
    ('{"backend": {"negative_label": true}}', "INSID3_NEGATIVE_LABEL (backend.negative_label) must be a str"),
])
def test_a_bad_value_in_the_served_settings_names_that_file(monkeypatch, tmp_path, capsys, served, named):
    (tmp_path / "served-engine-settings.json").write_text(served)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "k")
    assert main(["labelstudio", "preannotate", "--project", "3", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'served-engine-settings.json'} (written by serve): {named}" in err and "must" in err
