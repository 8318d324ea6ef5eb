"""``insid3 fiftyone install``, through a parser built with the plugin's ``register``."""

from __future__ import annotations

import argparse

import pytest

from fiftyone_plugin.commands import INSTALL_NAME, SOURCE, register
from insid3_core.cli import UsageError


def install(plugins_dir, *options, zoo_dir=None) -> int:
    parser = argparse.ArgumentParser(prog="insid3")
    register(parser.add_subparsers(dest="command", required=True))
    zoo_dir = zoo_dir or plugins_dir / "models"
    arguments = parser.parse_args(["fiftyone", "install", "--plugins-dir", str(plugins_dir),
                                   "--model-zoo-dir", str(zoo_dir), *options])
    return arguments.handler(arguments)


def test_link_install_is_idempotent(tmp_path):
    assert install(tmp_path) == 0
    installed = tmp_path / INSTALL_NAME
    assert installed.is_symlink() and installed.resolve() == SOURCE
    assert (installed / "fiftyone.yml").read_text().startswith('name: "@insid3/fiftyone"')
    assert install(tmp_path) == 0
    assert installed.resolve() == SOURCE


def test_copy_install_holds_the_plugin_files(tmp_path):
    assert install(tmp_path, "--copy") == 0
    installed = tmp_path / INSTALL_NAME
    assert not installed.is_symlink()
    assert {p.name for p in installed.iterdir()} >= {"fiftyone.yml", "__init__.py", "operators.py"}
    assert not list(installed.rglob("__pycache__"))
    assert install(tmp_path, "--copy") == 0  # identical copy: nothing to do


@pytest.mark.parametrize("existing", ["other_plugin", "link_then_copy"])
def test_refuses_to_replace_a_different_plugin_unless_forced(tmp_path, existing):
    installed = tmp_path / INSTALL_NAME
    if existing == "other_plugin":
        installed.mkdir()
        (installed / "fiftyone.yml").write_text('name: "@someone/else"\n')
    else:
        install(tmp_path)
    with pytest.raises(UsageError, match="--force"):
        install(tmp_path, "--copy")
    assert install(tmp_path, "--copy", "--force") == 0
    assert (installed / "operators.py").read_bytes() == (SOURCE / "operators.py").read_bytes()
    assert not installed.is_symlink()


def test_fiftyone_group_requires_an_action():
    parser = argparse.ArgumentParser(prog="insid3")
    register(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["fiftyone"])


def test_insid3_command_line_finds_the_entry_point(tmp_path, monkeypatch):
    """Through the ``insid3.commands`` entry point, ``insid3 fiftyone install`` reaches ``register``
    (an installed one, else the same line in a stand-in distribution)."""
    from importlib.metadata import entry_points

    from insid3_core.cli import main

    if not [entry for entry in entry_points(group="insid3.commands") if entry.name == "fiftyone"]:
        metadata = tmp_path / "site" / "insid3_entry_point-0.dist-info"
        metadata.mkdir(parents=True)
        (metadata / "METADATA").write_text("Metadata-Version: 2.1\nName: insid3-entry-point\nVersion: 0\n")
        (metadata / "entry_points.txt").write_text(
            "[insid3.commands]\nfiftyone = fiftyone_plugin.commands:register\n")
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert main(["fiftyone", "install", "--plugins-dir", str(tmp_path / "plugins"),
                 "--model-zoo-dir", str(tmp_path / "models")]) == 0
    assert (tmp_path / "plugins" / INSTALL_NAME).resolve() == SOURCE


def test_the_zoo_model_source_is_installed_once_and_others_are_kept(tmp_path, capsys):
    from fiftyone_plugin.zoo import SOURCE as ZOO_SOURCE

    zoo = tmp_path / "models"
    assert install(tmp_path / "plugins", zoo_dir=zoo) == 0
    for name in ("manifest.json", "__init__.py"):
        assert (zoo / "insid3" / name).read_bytes() == (ZOO_SOURCE / name).read_bytes()
    assert (zoo / "insid3" / "insid3-dinov3-torch.txt").is_file(), "counted as downloaded: weights come with load_zoo_model"
    capsys.readouterr()
    assert install(tmp_path / "plugins", zoo_dir=zoo) == 0
    assert "zoo model insid3-dinov3-torch already installed" in capsys.readouterr().err

    other = tmp_path / "other-zoo" / "insid3"
    other.mkdir(parents=True)
    (other / "manifest.json").write_text('{"name": "someone-else", "models": []}')
    with pytest.raises(UsageError, match="holds another zoo model source"):
        install(tmp_path / "plugins", zoo_dir=tmp_path / "other-zoo")
    assert (other / "manifest.json").read_text().startswith('{"name": "someone-else"')
    assert install(tmp_path / "plugins", "--force", zoo_dir=tmp_path / "other-zoo") == 0


def test_a_bad_folder_installs_nothing(tmp_path):
    from insid3_core.cli import UsageError
    from insid3_core.io import InputError

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(InputError, match="--plugins-dir .*is a file, not a folder"):
        install(a_file, zoo_dir=tmp_path / "zoo")
    with pytest.raises(InputError, match="--model-zoo-dir .*is a file, not a folder"):
        install(tmp_path / "plugins", zoo_dir=a_file)
    assert not (tmp_path / "plugins").exists() or not any((tmp_path / "plugins").iterdir()), "half installed"
    with pytest.raises(UsageError, match="--plugins-dir: an empty name"):
        install("", zoo_dir=tmp_path / "zoo")
