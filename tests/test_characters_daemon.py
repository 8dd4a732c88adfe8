"""Characters who stay themselves, through the real daemon: what outbox/NAME/characters/ holds,
what the manifest and the contact sheet say, and the PNGs under every way of making them.

No test can judge a face here (the tiny model's weights are random); what is checked is the
contract around the mechanism, on decoded files: one portrait per character a scene names,
published and on the contact sheet; the same PNGs on repeat, after kill -9 and resume, and for
a scene in another order and other company; a scene naming no one exactly as with consistency
off; references that change the scenes that name them. The engine = "ray" run is in
tests/test_ray.py (its one Ray daemon); the mechanism's invariants in tests/test_consistency*.py.

The first run (local engine, `run --once`) is shared by every test here (module-scoped).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.contactsheet import make_contact_sheet
from pipeline.images.consistency.reference import load_reference
from pipeline.images.consistency.tiny_adapter import ENCODER, WEIGHTS, build_tiny_ip_adapter

from characters import (
    KEEPER,
    KEEPER_REFERENCED,
    NO_CHARACTER,
    OTHERS,
    SAME_IN_OTHERS,
    broken_adapter,
    load_tiny,
)
from conftest import Setup, check_published

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("characters_daemon")]

HOLD = "mend nets"  # KEEPER's scene 2: where the daemon is killed


def pngs(outbox: Path, name: str) -> dict[str, bytes]:
    """Every PNG of a published story (scenes and portraits), by path inside its folder."""
    folder = outbox / name
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def manifest(outbox: Path, name: str) -> dict[str, Any]:
    return json.loads((outbox / name / "manifest.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Setup:
    """KEEPER and OTHERS, made by the local engine, consistency on (the default)."""
    s = Setup(tmp_path_factory.mktemp("first"), tiny_dir)
    s.drop("keeper.json", KEEPER)
    s.drop("others.json", OTHERS)
    done = s.run_once()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return s


def test_a_portrait_per_named_character_published_in_the_zip_and_on_the_sheet(first: Setup) -> None:
    m = check_published(first, "keeper", 4)
    out = first.outbox / "keeper"
    assert sorted(p.name for p in (out / "characters").iterdir()) == ["Mara.png", "Tom.png"]  # not Nobody
    for who in ("Mara", "Tom"):
        with Image.open(out / "characters" / f"{who}.png") as im:
            assert im.size == (first.width, first.height)
            assert np.asarray(im).std() > 2.0  # a picture, not a blank
    with zipfile.ZipFile(first.outbox / "keeper.zip") as zf:
        assert {"keeper/characters/Mara.png", "keeper/characters/Tom.png"} <= set(zf.namelist())

    # The manifest: per story, each portrait's seed and prompts; per scene, who was referenced, how.
    cast = m["characters"]
    assert list(cast) == ["Mara", "Tom"]
    assert cast["Mara"]["file"] == "characters/Mara.png" and cast["Mara"]["source"] == "generated"
    assert cast["Mara"]["prompt"].startswith("Mara, a woman in her sixties") and cast["Mara"]["negative"]
    assert cast["Mara"]["seed"] != cast["Tom"]["seed"] and len(cast["Mara"]["reference_sha256"]) == 64
    referenced = [sc["characters_referenced"] for sc in m["scenes"]]
    assert referenced == KEEPER_REFERENCED
    method = m["scenes"][1]["consistency"]
    assert method["method"] == "shared self-attention on a replayed reference trajectory"
    assert "2 layers" in method["shared_layers"] and method["ip_adapter"] is None
    assert [(r["file"], r["reference_sha256"]) for r in method["references"]] == [
        ("characters/Mara.png", cast["Mara"]["reference_sha256"]),
        ("characters/Tom.png", cast["Tom"]["reference_sha256"]),
    ]
    assert m["scenes"][NO_CHARACTER - 1]["consistency"] is None
    assert m["model"]["characters"]["consistency"] == "on"

    # The contact sheet is the one make_contact_sheet draws from these scenes and this cast.
    items = [(out / sc["image"], sc["scene"], sc["description"]) for sc in m["scenes"]]
    again = first.root / "sheet-again.jpg"
    cast_pictures = [(who, out / "characters" / f"{who}.png") for who in ("Mara", "Tom")]
    make_contact_sheet(items, again, title=KEEPER["title"], cast=cast_pictures)
    assert (out / "contact_sheet.jpg").read_bytes() == again.read_bytes()
    plain = first.root / "sheet-without-cast.jpg"
    make_contact_sheet(items, plain, title=KEEPER["title"])
    with Image.open(out / "contact_sheet.jpg") as sheet, Image.open(plain) as without:
        assert sheet.size != without.size  # the cast takes cells of its own


def test_a_scene_is_the_same_in_any_order_and_company(first: Setup) -> None:
    keeper, others = pngs(first.outbox, "keeper"), pngs(first.outbox, "others")
    for there, here in SAME_IN_OTHERS.items():
        assert others[f"images/scene_{there:03d}.png"] == keeper[f"images/scene_{here:03d}.png"], there
    assert others["characters/Tom.png"] == keeper["characters/Tom.png"]  # Tom's portrait, without Mara
    assert "characters/Mara.png" not in others
    tom = [manifest(first.outbox, n)["characters"]["Tom"]["reference_sha256"] for n in ("keeper", "others")]
    assert tom[0] == tom[1]  # the reference itself, to the bit


def test_kill_9_mid_story_resumes_with_the_recorded_references(
    first: Setup, tmp_path: Path, tiny_dir: Path
) -> None:
    """Killed in scene 2 (after the portraits): the restart replays them and the PNGs are the same."""
    s = Setup(tmp_path, tiny_dir)
    s.drop("keeper.json", KEEPER)
    d = s.start(faults=s.hold(scene=HOLD))  # never released: killed while holding
    d.logged(f"FAULT holding {HOLD}")
    made = d.events("portrait made")
    assert sorted(e["character"] for e in made) == ["Mara", "Tom"]
    d.proc.kill()
    d.wait()
    works = list((s.state / "spool" / "queue").glob("*/work"))
    spool = s.state / "spool"
    tree = sorted(str(p.relative_to(spool)) for p in spool.rglob("*") if "work/" not in str(p))
    assert len(works) == 1, (tree, d.output()[-4000:])  # the claim, as the kill left it
    work = works[0]
    recorded = {p.name for p in (work / "characters").iterdir()}
    assert recorded == {"Mara.npz", "Mara.json", "Tom.npz", "Tom.json"}
    mara = load_reference(work / "characters" / "Mara.npz")
    assert (mara.character, mara.source, mara.steps, mara.latents.shape[0]) == ("Mara", "generated", 2, 3)
    again = s.start()
    again.wait_for(lambda: s.last_state("keeper") == "done", "keeper done after the restart")
    again.stop()
    assert sorted(e["character"] for e in again.events("portrait replayed")) == ["Mara", "Tom"]
    assert again.events("portrait made") == []  # replayed, not rendered again
    check_published(s, "keeper", 4)
    assert pngs(s.outbox, "keeper") == pngs(first.outbox, "keeper")  # a repeat, in fresh processes


def test_a_scene_naming_no_one_is_made_as_with_consistency_off(
    first: Setup, tmp_path: Path, tiny_dir: Path
) -> None:
    s = Setup(tmp_path, tiny_dir, characters={"consistency": "off"})
    s.drop("keeper.json", KEEPER)
    done = s.run_once()
    assert done.returncode == 0, done.stderr[-3000:]
    m = check_published(s, "keeper", 4)
    off, on = pngs(s.outbox, "keeper"), pngs(first.outbox, "keeper")
    assert not (s.outbox / "keeper" / "characters").exists() and "characters" not in m
    assert m["model"]["characters"] == {
        "consistency": "off",
        "shared_layers": 0,
        "reference_pass": "every step of every scene",
        "ip_adapter": None,
    }
    assert all(sc["characters_referenced"] == [] for sc in m["scenes"])
    for n in range(1, 5):
        key = f"images/scene_{n:03d}.png"
        if n == NO_CHARACTER:
            assert off[key] == on[key]
        else:  # with their references in view, the scenes naming characters come out otherwise
            assert off[key] != on[key], key


@pytest.fixture(scope="module")
def adapter(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_ip_adapter(tmp_path_factory.mktemp("ipa") / "IP-Adapter", load_tiny(tiny_dir).unet)


def test_ip_adapter_weights_steer_the_scenes_that_name_characters(
    first: Setup, adapter: Path, tmp_path: Path, tiny_dir: Path
) -> None:
    s = Setup(tmp_path, tiny_dir, characters={"ip_adapter": adapter})
    s.drop("keeper.json", KEEPER)
    done = s.run_once()
    assert done.returncode == 0, done.stderr[-3000:]
    m = check_published(s, "keeper", 4)
    ip = m["model"]["characters"]["ip_adapter"]
    assert ip == {"folder": str(adapter), "file": WEIGHTS, "encoder": ENCODER, "scale": 0.6}
    assert m["scenes"][1]["consistency"]["ip_adapter"] == ip
    with_ip, without = pngs(s.outbox, "keeper"), pngs(first.outbox, "keeper")
    # The portraits are plain renders (the adapter neutral, at scale 0): the same as without it;
    # so is the scene naming no one. The scenes naming characters are steered by their pictures.
    assert with_ip["characters/Mara.png"] == without["characters/Mara.png"]
    for n in range(1, 5):
        key = f"images/scene_{n:03d}.png"
        assert (with_ip[key] == without[key]) == (n == NO_CHARACTER), key


@pytest.mark.parametrize("how", ["no folder", "encoder does not fit"])
def test_an_unusable_adapter_folder_stops_start_up(
    adapter: Path, tmp_path: Path, tiny_dir: Path, how: str
) -> None:
    folder = broken_adapter(adapter, tmp_path, how)
    s = Setup(tmp_path / "run", tiny_dir, characters={"ip_adapter": folder})
    out = s.run_once()
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if f"characters.ip_adapter: {folder}" in line]
    assert len(lines) == 1, out.stderr[-3000:]
    said = {"no folder": "is not a folder", "encoder does not fit": "does not fit the adapter"}[how]
    assert said in lines[0], lines
