"""`tlserve build`'s mistakes and failures, with stand-in engines: an unknown device kind, no engine, an
engine that does not answer, a build that fails or hangs after tagging. Each is one line and exit 2 (or
a UserError naming the log), and no image is left under the tag. The real image: tests/test_container.py."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

from serving import containers
from serving.base.errors import UserError

pytestmark = pytest.mark.fast

TAG = "tlserve-cpu:abc123"


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nPATH=/usr/bin:/bin\n" + body)  # PATH: the test's holds only the stand-ins
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake_docker(tmp_path, monkeypatch):
    """A `docker` on PATH whose images are files in tmp_path/images (the tag's ':' as '_'), and whose
    client has no buildx plugin; `fake_docker(BODY)` writes a `bentoml` whose containerize runs BODY (bash,
    with `tag_it` to tag the image) and returns its path and the images folder."""
    bin_dir, images = tmp_path / "bin", tmp_path / "images"
    bin_dir.mkdir()
    images.mkdir()
    _script(bin_dir / "docker", f"""images={images}
case "$1 $2" in
  "version --format") echo 20.10.24 ;;
  "buildx version") exit 1 ;;
  "image inspect") f=$images/${{@: -1}}; f=${{f/:/_}}; [ -f "$f" ] && cat "$f" || exit 1 ;;
  "image rm") f=$images/${{@: -1}}; rm -f "${{f/:/_}}" ;;
  *) exit 3 ;;
esac
""")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("DOCKER_BUILDKIT", raising=False)

    def with_build(body: str) -> Path:
        exe = _script(bin_dir / "bentoml", f"tag_it() {{ echo 123456789 > {images}/{TAG.replace(':', '_')}; }}\n{body}")
        return exe, images

    return with_build


def test_device_kinds_differ_only_in_the_onnxruntime_wheel():
    from serving.bento import REQUIREMENTS, requirements_for

    cpu, gpu = requirements_for("cpu").splitlines(), requirements_for("gpu").splitlines()
    assert cpu == REQUIREMENTS.read_text().splitlines()
    changed = [(a, b) for a, b in zip(cpu, gpu) if a != b]
    assert len(cpu) == len(gpu) and len(changed) == 1
    (was, now), = changed
    assert was.startswith("onnxruntime==") and now == was.replace("onnxruntime==", "onnxruntime-gpu[cuda,cudnn]==")


def test_unknown_device_kind_is_one_line(run_cli):
    result = run_cli("build", "some-model", "--device", "tpu")
    assert result.code == 2
    assert result.err.strip() == "error: unknown --device 'tpu'; nearest: gpu, cpu; choose from cpu, gpu"


def test_no_engine_names_how_to_get_one_before_building_anything(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no docker, no podman; the model is never looked up
    result = run_cli("build", "no-such-model", "--device", "cpu")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "no container engine found (docker or podman): install Docker" in result.err
    assert "apt-get install docker.io" in result.err and "--no-image" in result.err


def test_an_engine_that_does_not_answer_says_how_to_start_it(run_cli, tmp_path, monkeypatch):
    _script(tmp_path / "docker", "echo 'Cannot connect to the Docker daemon' >&2; exit 1\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    result = run_cli("build", "no-such-model", "--engine", "docker")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "docker is installed but cannot build: start its daemon (sudo systemctl start docker)" in result.err
    assert run_cli("build", "m", "--engine", "dokcer").err.strip().startswith("error: unknown --engine 'dokcer'; nearest: docker")


def test_the_engine_that_answers_is_picked(fake_docker):
    assert containers.find_engine("auto") == "docker"


def test_a_build_that_succeeds_prints_size_and_run_command(fake_docker):
    bentoml, _ = fake_docker('echo "DOCKER_BUILDKIT=$DOCKER_BUILDKIT args=$*"; tag_it\n')
    built = containers.build_image(str(bentoml), TAG, "docker", "--gpus all", network="host")
    assert (built.tag, built.size_bytes) == (TAG, 123456789)
    assert built.run_command == f"docker run --rm --gpus all -p 3000:3000 {TAG}"


def test_a_failed_build_leaves_no_tagged_image_and_names_its_log(fake_docker):
    bentoml, images = fake_docker('echo "DOCKER_BUILDKIT=$DOCKER_BUILDKIT args=$*"; tag_it; echo "step 7: uv failed"; exit 1\n')
    with pytest.raises(UserError) as failed:
        containers.build_image(str(bentoml), TAG, "docker", "", network="host")
    log = Path(str(failed.value).rsplit("its log: ", 1)[1])
    assert str(failed.value).startswith("the image build failed (exit 1)")
    text = log.read_text()
    # the client has no buildx: the classic builder; the network reaches BentoML as an --opt
    assert "step 7: uv failed" in text and "DOCKER_BUILDKIT=0" in text and "--opt network=host" in text
    assert not list(images.iterdir())
    log.unlink()


def test_a_build_stopped_after_tagging_leaves_no_image(fake_docker, monkeypatch):
    bentoml, images = fake_docker("tag_it; sleep 30\n")
    monkeypatch.setattr(containers, "BUILD_TIMEOUT_S", 1)
    with pytest.raises(UserError, match="took over 1 s and was stopped"):
        containers.build_image(str(bentoml), TAG, "docker", "")
    assert not list(images.iterdir())
