"""gen_jax installs on the accelerator images users have without touching their packages.

GPU and TPU images (Colab runtimes, CUDA images such as the H200 machine of this project) ship a
jax matched to their CUDA or TPU runtime. If `setup.cfg` capped jax, or asked for a newer flax,
optax or orbax-checkpoint than the image has, `pip install -e .` would replace the image's
packages (and fail on a machine without network). So `install_requires` holds lower bounds only,
each image's versions must satisfy them (read with `packaging`), and nothing the image lacks
(TensorFlow, TFDS) may be required. `requirements.txt` stays the exact, tested CPU set.

The GPU image (one H200; /work/.library/device/KINDS.md, read 2026-11): Python 3.12.3, jax,
jaxlib, jax-cuda13-plugin and jax-cuda13-pjrt 0.11.2, numpy 2.5.2; flax, optax, orbax-checkpoint
and chex are installed but their versions were not recorded. The versions "that shipped alongside
jax 0.11.2" are chosen as the newest release of each that accepts jax 0.11.2 and came out while
jax 0.11.2 was the newest jax: jax 0.11.2 dates from 2026-09-17 and jax 0.12.0 from 2026-10-16
(the dates of the files inside their wheels, fetched with `pip download --no-deps`; Requires-Dist
read from each wheel's METADATA):

- flax 0.12.10 (2026-09-24; Requires-Dist jax>=0.11.1, Python >= 3.12; there is no 0.12.11),
- optax 0.2.8 (2026-03-20, the newest release; jax>=0.5.3),
- orbax-checkpoint 0.12.7 (2026-10-06; jax>=0.6.0; 0.12.8 came on 2026-10-20),
- chex 0.1.92 (2026-06-12, the newest release; jax>=0.7.0).

Since KINDS.md saw jax 0.11.2 still in November, the image may have been built after jax 0.12.0
with jax held back, so the newest releases that accept jax 0.11.2 as of that reading (flax
0.12.12 of 2026-10-27, orbax-checkpoint 0.12.8) are checked as a second image. gen_jax ran under
the first set (Python 3.12, CPU jaxlib 0.11.2) through experiments/gpu_check.sh --allow-cpu.
"""
import configparser
import pathlib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SHARED = {
    "python": "3.12.3",
    "jax": "0.11.2",
    "jaxlib": "0.11.2",
    "numpy": "2.5.2",
    "optax": "0.2.8",
    "chex": "0.1.92",
}
IMAGES = {
    "gpu-h200-contemporaneous": {
        **_SHARED, "flax": "0.12.10",
        "orbax-checkpoint": "0.12.7"
    },
    "gpu-h200-newest-for-jax-0.11.2": {
        **_SHARED, "flax": "0.12.12",
        "orbax-checkpoint": "0.12.8"
    },
}
# Packages installed on the GPU image (KINDS.md's list), by name: versions unrecorded.
IMAGE_PACKAGES = {
    "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "scipy", "scikit-learn",
    "pillow", "matplotlib", "tqdm", "packaging"
}
# What the image does not have: the main job must not need it.
NOT_ON_IMAGE = ("tensorflow", "tensorflow-datasets", "tensorflow-cpu", "importlib-resources")


def _setup_cfg() -> configparser.ConfigParser:
  parser = configparser.ConfigParser()
  parser.read(ROOT / "setup.cfg")
  return parser


def _requirements(value: str) -> list[Requirement]:
  lines = [l.strip() for l in value.splitlines()]
  return [Requirement(l) for l in lines if l and not l.startswith("#")]


def _install_requires() -> list[Requirement]:
  return _requirements(_setup_cfg()["options"]["install_requires"])


def test_install_requires_has_lower_bounds_only():
  reqs = _install_requires()
  assert {canonicalize_name(r.name) for r in reqs} >= {"jax", "flax", "optax", "orbax-checkpoint"}
  for req in reqs:
    assert req.specifier, f"{req} has no lower bound"
    capped = [s for s in req.specifier if s.operator not in (">=", ">")]
    assert not capped, (f"{req}: {capped} would make pip replace an accelerator image's "
                        "package; give a lower bound only")


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_accelerator_image_versions_satisfy_setup_cfg(image):
  versions = {canonicalize_name(k): v for k, v in IMAGES[image].items()}
  python_requires = SpecifierSet(_setup_cfg()["options"]["python_requires"])
  assert python_requires.contains(versions["python"]), python_requires
  for req in _install_requires():
    name = canonicalize_name(req.name)
    assert name in IMAGE_PACKAGES, f"{req.name} is not on the image: installing would fetch it"
    if name in versions:
      assert req.specifier.contains(versions[name], prereleases=True), (
          f"{image} has {req.name} {versions[name]}, outside {req}: installing gen_jax there "
          "would replace it")


def test_nothing_the_image_lacks_is_required():
  names = {canonicalize_name(r.name) for r in _install_requires()}
  assert not names & set(NOT_ON_IMAGE), names & set(NOT_ON_IMAGE)
  extras = _setup_cfg()["options.extras_require"]
  tfds = {canonicalize_name(r.name) for r in _requirements(extras["tfds"])}
  assert {"tensorflow-datasets", "importlib-resources"} <= tfds  # reading TFDS data: an extra


def test_requirements_txt_is_the_exact_cpu_set_within_the_bounds():
  pins = {}
  for line in (ROOT / "requirements.txt").read_text().splitlines():
    line = line.strip()
    if not line or line.startswith("#") or line == "-e .":
      continue
    req = Requirement(line)
    (spec,) = req.specifier
    assert spec.operator == "==", f"requirements.txt pins exact versions; got {line!r}"
    pins[canonicalize_name(req.name)] = spec.version
  # The CPU tests read TFDS through tfds.testing.mock_data.
  assert "tensorflow-datasets" in pins
  for req in _install_requires():
    name = canonicalize_name(req.name)
    assert name in pins, f"{req.name} is required but not pinned in requirements.txt"
    assert req.specifier.contains(pins[name]), f"the tested pin {pins[name]} is outside {req}"
