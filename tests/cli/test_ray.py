"""``insid3 segment --ray`` on a real local Ray runtime (and a ``ray start --head`` cluster): the
single-machine masks byte for byte, resume, a bad target in the middle, an actor killed mid-job, an
actor whose engine cannot start or runs out of memory, a bad reference refused before Ray starts.

Each run is a subprocess, so its Ray runtime stops with it. Ray's servers bind every interface
whatever ``--node-ip-address`` says (Ray replaces a loopback address by the host's), so the cluster
of :func:`test_a_ray_start_cluster_gives_the_same_masks` runs with token authentication on and a
random token, and is stopped in teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from data import EXAMPLES
from insid3_core.backbone import BUNDLED_CHECKPOINT
from test_cli import FAST, REFERENCE

pytestmark = [pytest.mark.slow, pytest.mark.skipif(find_spec("ray") is None, reason="needs the ray extra")]

INSID3 = str(Path(sys.executable).parent / "insid3")
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> Path:
    """24 targets: the 8 examples, mirrored and flipped (distinct content and names); beside them
    two files that are not images (:func:`left_out_note`)."""
    folder = tmp_path_factory.mktemp("targets")
    for path in sorted((EXAMPLES / "targets").glob("*.png")):
        with Image.open(path) as image:
            image.save(folder / path.name)
            ImageOps.mirror(image).save(folder / f"mirrored_{path.name}")
            ImageOps.flip(image).save(folder / f"flipped_{path.name}")
    for name in ("notes.txt", "README"):
        (folder / name).write_text("not an image")
    return folder


def left_out_note(spec) -> str:
    """What the single machine and the Ray job say of the two files of :func:`targets` that are not images."""
    return f"insid3: {spec}: left out 2 file(s) that are not images insid3 reads (.txt 1, no extension 1)"


@pytest.fixture(scope="module")
def single_machine(targets, tmp_path_factory) -> Path:
    """The targets' outputs of the single-machine command."""
    out = tmp_path_factory.mktemp("single") / "out"
    done = run(targets, out)
    assert done.returncode == 0 and left_out_note(targets) in done.stderr, done.stderr
    return out


def run(target, out, *options, env=None, cwd=None) -> subprocess.CompletedProcess:
    """``insid3 segment --ref ... TARGET... --out OUT OPTIONS`` in a subprocess (``env`` added,
    in ``cwd``); ``target``: one or a list."""
    given = [str(path) for path in (target if isinstance(target, list) else [target])]
    command = [INSID3, "segment", "--ref", *REFERENCE, *FAST, *given, "--out", str(out), *map(str, options)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
                          cwd=cwd)


def masks(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.png"))}


def document(out: Path) -> dict:
    return json.loads((out / "annotations.json").read_text())


def assert_same_outputs(out: Path, expected: Path) -> None:
    assert masks(out) == masks(expected), "the masks are the single machine's, byte for byte"
    got, want = document(out), document(expected)
    assert got["images"] == want["images"] and got["annotations"] == want["annotations"]
    assert got["categories"] == want["categories"]
    names = [image["file_name"] for image in got["images"]]
    assert len(names) == len(set(names)) == len(masks(expected)), "every target once"
    assert not (out / ".insid3-parts").exists(), "the fragments are gone once merged"


def test_two_local_actors_give_the_single_machines_outputs_and_resume(targets, single_machine, tmp_path):
    out = tmp_path / "out"
    done = run(targets, out, "--ray", "local", "--actors", "2")
    assert done.returncode == 0, done.stderr
    assert "segmented 24, skipped 0, failed 0" in done.stderr
    assert left_out_note(targets) in done.stderr, "the files that are not images are counted, as on one machine"
    assert_same_outputs(out, single_machine)

    written = {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")}
    for name in ("scene_02.png", "mirrored_scene_05.png", "flipped_scene_07.png"):
        (out / name).unlink()
    again = run(targets, out, "--ray", "local", "--actors", "2")
    assert again.returncode == 0, again.stderr
    assert "segmented 3, skipped 21, failed 0" in again.stderr
    assert_same_outputs(out, single_machine)
    kept = {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")}
    assert all(kept[name] == stamp for name, stamp in written.items() if name in kept and
               name not in ("scene_02.png", "mirrored_scene_05.png", "flipped_scene_07.png")), "skipped, not rewritten"


def test_a_bad_target_is_named_and_the_others_are_written(targets, single_machine, tmp_path):
    broken = tmp_path / "m_broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "out"
    done = run([targets, broken], out, "--ray", "local", "--actors", "2")
    assert done.returncode == 1
    assert "segmented 24, skipped 0, failed 1" in done.stderr
    assert f"FAILED {broken}: unreadable or truncated image" in done.stderr
    assert_same_outputs(out, single_machine)


def actor_pids() -> list[int]:
    """Processes of the engine actors (Ray titles them ``ray::MapWorker(MapBatches(SegmentActor))``)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"SegmentActor" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_an_actor_killed_mid_job_is_replaced_and_nothing_is_lost_or_duplicated(targets, single_machine, tmp_path):
    out = tmp_path / "out"
    command = [INSID3, "segment", "--ref", *REFERENCE, *FAST, str(targets), "--out", str(out),
               "--ray", "local", "--actors", "2"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(list(out.glob("*.png"))) < 3 or not actor_pids():
            assert job.poll() is None, job.communicate()[1]
            assert time.monotonic() < deadline, "no mask within 300 s"
            time.sleep(0.05)
        killed = actor_pids()[0]
        os.kill(killed, signal.SIGKILL)
        written_before = len(list(out.glob("*.png")))
        _, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert written_before < 24, "the actor died mid-job"
    assert job.returncode == 0, stderr
    assert "segmented 24, skipped 0, failed 0" in stderr
    assert_same_outputs(out, single_machine)


def test_a_bad_reference_is_refused_before_ray_starts(targets, tmp_path):
    empty = tmp_path / "empty_mask.png"
    Image.new("L", Image.open(REFERENCE[0]).size).save(empty)
    started = time.monotonic()
    done = subprocess.run([INSID3, "segment", "--ref", REFERENCE[0], str(empty), *FAST, str(targets), "--out",
                           str(tmp_path / "out"), "--ray", "local"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert f"{empty}: reference mask is empty" in done.stderr
    assert "Ray" not in done.stderr, "no Ray runtime was started"
    assert time.monotonic() - started < 60
    missing = run(tmp_path / "nothing_here", tmp_path / "out2", "--ray", "local")
    assert missing.returncode == 2 and "nothing_here: no such file" in missing.stderr
    nobody = f"127.0.0.1:{free_port()}"
    unreachable = run(targets, tmp_path / "out3", "--ray", nobody)
    assert unreachable.returncode == 2 and f"--ray {nobody}: no Ray cluster answers there" in unreachable.stderr


def test_an_engine_that_cannot_start_on_a_worker_stops_the_job_with_its_reason(targets, single_machine, tmp_path):
    """A checkpoint the workers cannot load (on a cluster: a file only the driver's machine holds,
    or a damaged copy): exit 2 naming the node and the file, no traceback, the earlier masks still
    listed; :func:`~insid3_core.distributed.iter_predictions` (the FiftyOne plugin's fan-out)
    raises :class:`~insid3_core.distributed.WorkerError` with the same reason."""
    broken = tmp_path / "damaged.pth"
    broken.write_bytes(b"\x00" * 4096)
    out = tmp_path / "out"
    shutil.copytree(single_machine, out)
    done = run(targets, out, "--ray", "local", "--overwrite", "--weights", broken)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("insid3: error: the engine actor on Ray node ") and "could not start its engine: " \
        f"{broken}: not a PyTorch checkpoint" in last and "(run again to resume)" in last, last
    assert "Traceback" not in done.stderr
    assert_same_outputs(out, single_machine)  # --overwrite, but nothing was segmented: nothing replaced or lost

    script = f"""
import sys
from insid3_core.distributed import ClusterOptions, JobSpec, WorkerError, iter_predictions, reference_payload
from insid3_core.settings import EngineSettings
payload = reference_payload({{"object": [({REFERENCE[0]!r}, {REFERENCE[1]!r})]}}, [])
job = JobSpec(EngineSettings(weights={str(broken)!r}, image_size=128, device="cpu"), None, ("object",), None, False,
              payload)
try:
    list(iter_predictions(job, [{{"path": {str(sorted(targets.glob("*.png"))[0])!r}}}], ClusterOptions("local")))
except WorkerError as err:
    sys.exit(f"WorkerError: {{err}}")
"""
    raised = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert "WorkerError: the engine actor on Ray node" in raised.stderr and \
        f"{broken}: not a PyTorch checkpoint" in raised.stderr, raised.stderr


ACTOR_UNDER_A_MEMORY_CAP = """
import json, resource, sys
import numpy as np
from insid3_core.distributed import JobSpec, SegmentActor, prepare_batch, reference_payload
from insid3_core.settings import EngineSettings

reference, mask, *targets = sys.argv[1:]
job = JobSpec(EngineSettings(image_size=2048, svd_components=8, device="cpu", batch_size=2), None, ("object",),
              None, False, reference_payload({"object": [(reference, mask)]}, []))
actor = SegmentActor(job)
batch = prepare_batch({"path": np.array(targets, dtype=object)}, job)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
cap = int(status["VmSize"].split()[0]) * 1024 + (1 << 30)  # what it has mapped, and 1 GiB more
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
for _ in range(2):
    answer = actor(batch)
    print(json.dumps({name: list(column) for name, column in answer.items()}))
"""


def test_an_engine_actor_out_of_memory_answers_why_instead_of_raising(targets):
    """A batch that does not fit (a real allocation failure, under an address-space cap: 2048 px,
    whose clustering alone needs 2 GiB) is answered with the out-of-memory message on every row,
    as is every later batch; Ray would otherwise retry it and end with its own traceback."""
    paths = [str(targets / "scene_01.png"), str(targets / "scene_02.png")]
    answer = subprocess.run([sys.executable, "-c", ACTOR_UNDER_A_MEMORY_CAP, *REFERENCE, *paths],
                            capture_output=True, text=True, timeout=600)
    assert answer.returncode == 0, answer.stderr[-2000:]
    lines = answer.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1], answer.stdout
    columns = json.loads(lines[0])
    assert columns["key"] == paths and columns["prediction"] == [None, None]
    fatal = columns["fatal"]
    assert len(set(fatal)) == 1 and fatal[0].startswith("the engine actor on Ray node ") and \
        " stopped: out of memory (" in fatal[0] and "lower batch_size (--batch-size, INSID3_BATCH_SIZE)" in fatal[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """``ray start --head`` on this machine, token authentication on; its address and environment."""
    with started_cluster(head_cpus=4) as (address, env):
        yield address, env


@contextlib.contextmanager
def started_cluster(head_cpus: int, node_command: str | None = None):
    """``ray start --head`` with ``head_cpus`` CPUs, token authentication on, and, given a
    ``node_command`` (a shell command ``{ray_start}`` ends), a worker node; the address and the
    environment. Every Ray process of the machine is stopped after."""
    port = free_port()
    sessions = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": sessions}
    environment = {**os.environ, **env}
    try:
        started = subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                                  "--include-dashboard", "false", "--num-cpus", str(head_cpus),
                                  "--disable-usage-stats"], capture_output=True, text=True, timeout=120, env=environment)
        assert started.returncode == 0, started.stderr
        if node_command is not None:
            ray_start = f"{RAY} start --address 127.0.0.1:{port} --node-ip-address 127.0.0.1 --num-cpus 4 " \
                        "--disable-usage-stats"
            joined = subprocess.run(["sh", "-c", node_command.format(ray_start=ray_start)], capture_output=True,
                                    text=True, timeout=120, env=environment)
            assert joined.returncode == 0, joined.stderr
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120, env=environment)
        shutil.rmtree(sessions, ignore_errors=True)


def can_mount_privately() -> bool:
    """Whether this process may make a private mount namespace and mount a tmpfs in it (root)."""
    return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("unshare") is None or not can_mount_privately(),
                    reason="needs unshare and mount (root) for a node with a private folder")
def test_an_output_folder_the_nodes_do_not_share_is_named_not_silently_left_out(targets, tmp_path):
    """The actors run on a node that sees its own empty folder at ``--out`` (a tmpfs in a private
    mount namespace): their masks and fragments land there, out of the driver's sight. That was
    exit 0 with "segmented 0" and an empty ``annotations.json``; it is exit 2 naming the folder."""
    out = tmp_path / "out"
    out.mkdir()
    node = f"unshare -m --propagation private sh -c 'mount -t tmpfs none {out} && {{ray_start}}'"
    with started_cluster(head_cpus=0, node_command=node) as (address, env):
        done = run(targets, out, "--ray", address, env=env)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"insid3: error: --out {out}: ") and "the Ray nodes do not share this folder" in last, last
    assert not list(out.glob("*.png")), "the masks are on the other node's folder"


def test_a_ray_start_cluster_gives_the_same_masks(targets, single_machine, tmp_path, ray_cluster):
    """Also with ``--weights`` relative to the driver's working directory, which is not the
    workers' (theirs is where ``ray start`` ran); and ``--ray local`` beside it, with
    ``RAY_ADDRESS`` naming it, starts a runtime of its own."""
    import numpy as np

    address, env = ray_cluster
    out = tmp_path / "out"
    done = run(targets, out, "--ray", address, "--actors", "2", env=env)
    assert done.returncode == 0, done.stderr
    assert_same_outputs(out, single_machine)
    relative = run(targets, tmp_path / "relative", "--ray", address, "--weights", "tiny_dinov3_meta.pth", env=env,
                   cwd=BUNDLED_CHECKPOINT.parent)
    assert relative.returncode == 0, relative.stderr
    for name in masks(single_machine):  # the same pixels (the records name other weights)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "relative" / name)),
                                      np.asarray(Image.open(single_machine / name)))
    beside = run(targets, tmp_path / "beside", "--ray", "local", env={**env, "RAY_ADDRESS": address})
    assert beside.returncode == 0 and "Started a local Ray instance" in beside.stderr, beside.stderr
    refused = run(targets, tmp_path / "other", "--ray", address, env={**env, "RAY_AUTH_TOKEN": "0" * 64})
    assert refused.returncode != 0, "a client without the cluster's token is turned away"


def test_targets_given_as_a_file_uri_are_listed_and_read_through_pyarrow(targets, single_machine, tmp_path):
    """The URI path (pyarrow's filesystem, as for s3:// or gs://): the same pixels and
    annotations; each record names its source by its URI."""
    import numpy as np

    out = tmp_path / "out"
    done = run(f"file://{targets}", out, "--ray", "local")
    assert done.returncode == 0, done.stderr
    assert "segmented 24, skipped 0, failed 0" in done.stderr
    assert left_out_note(f"file://{targets}") in done.stderr
    got, want = document(out), document(single_machine)
    assert got["annotations"] == want["annotations"]
    assert [image["source"] for image in got["images"]] == [f"file://{image['source']}" for image in want["images"]]
    for name in masks(single_machine):
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(single_machine / name)))


def test_targets_sharing_a_file_stem_never_replace_each_others_mask(targets, tmp_path):
    """``a/scene_01.png``, ``b/scene_01.png`` and ``b/scene_01.jpg`` (other content) map to one
    output: the single machine refuses them up front; the streamed job, which cannot see the
    whole listing, keeps the first mask placed and fails the others (with ``--overwrite``, where
    any may have written last, it lists none and fails all). A mask made again from
    ``scene_01.jpg`` takes the place of ``scene_01.png``'s record."""
    other = tmp_path / "other"
    other.mkdir()
    with Image.open(targets / "scene_01.png") as image:
        ImageOps.invert(image.convert("RGB")).save(other / "scene_01.png")
        ImageOps.mirror(image.convert("RGB")).save(other / "scene_01.jpg", quality=95)
    given = [targets, other / "scene_01.png", other / "scene_01.jpg"]
    out = tmp_path / "out"
    done = run(given, out, "--ray", "local", "--actors", "2")
    assert done.returncode == 1
    assert "segmented 24, skipped 0, failed 2" in done.stderr
    assert done.stderr.count(f"another target's mask is at {out / 'scene_01.png'} (same file stem)") == 2
    listed = [image for image in document(out)["images"] if image["file_name"].startswith("scene_01.")]
    assert len(listed) == 1
    assert listed[0]["source_sha256"] == json.loads(Image.open(out / "scene_01.png").text["insid3-record"])[
        "image"]["source_sha256"], "the listed record is the mask's own"

    again = run(other / "scene_01.jpg", out, "--ray", "local", "--overwrite")
    assert again.returncode == 0, again.stderr
    images = document(out)["images"]
    assert [image["file_name"] for image in images if image["file_name"].startswith("scene_01.")] == ["scene_01.jpg"]
    assert len(images) == 24, "the 23 other masks stay listed"
    assert json.loads(Image.open(out / "scene_01.png").text["insid3-record"])["image"]["file_name"] == "scene_01.jpg"

    clashing = run(given, out, "--ray", "local", "--overwrite")
    assert clashing.returncode == 1
    assert "segmented 23, skipped 0, failed 3" in clashing.stderr
    assert clashing.stderr.count("shares its output mask scene_01.png") == 3
    assert not [image for image in document(out)["images"] if image["file_name"].startswith("scene_01.")]


def test_an_output_folder_uri_gets_the_same_bytes_and_resumes(targets, single_machine, tmp_path):
    """``--out file://...``: the object-store path (one put per mask, the fragments fetched for
    the merge, annotations.json put back), byte for byte the single machine's; run again, every
    target is skipped."""
    out = tmp_path / "bucket" / "masks"
    done = run(targets, f"file://{out}", "--ray", "local", "--actors", "2")
    assert done.returncode == 0, done.stderr
    assert_same_outputs(out, single_machine)
    again = run(targets, f"file://{out}", "--ray", "local")
    assert again.returncode == 0 and "segmented 0, skipped 24, failed 0" in again.stderr, again.stderr
    assert_same_outputs(out, single_machine)
    refused = run(targets, f"file://{out}", FAST[0], FAST[1])  # no --ray
    assert refused.returncode == 2 and "a URI needs --ray" in refused.stderr
