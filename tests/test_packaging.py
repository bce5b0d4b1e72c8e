"""The root napari.yaml is the manifest napari finds, from an editable install and a wheel."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from npe2 import PluginManager, PluginManifest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_plugin_is_discovered_with_its_contributions():
    pm = PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-bach")
    assert {w.display_name for w in manifest.contributions.widgets} >= {"Segment nuclei"}
    assert manifest.contributions.readers and manifest.contributions.sample_data


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source tree")
def test_wheel_ships_the_root_manifest_and_its_entry_point(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("napari_bach-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert zf.read("napari_bach/napari.yaml") == (ROOT / "napari.yaml").read_bytes()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        shipped_model = [n for n in names if n.startswith("napari_bach/models/")]
        zf.extract("napari_bach/napari.yaml", tmp_path)
    assert "[napari.manifest]" in entry_points and "napari_bach:napari.yaml" in entry_points
    assert {"src_train/train.py", "napari_bach/predict.py"} <= set(names)
    expected = sorted(f"napari_bach/models/{n}" for n in ("default.pt", "tissue.pt") if (ROOT / "napari_bach/models" / n).exists())
    assert sorted(shipped_model) == expected  # the nucleus model and the tissue classifier
    assert PluginManifest.from_file(tmp_path / "napari_bach/napari.yaml").name == "napari-bach"
