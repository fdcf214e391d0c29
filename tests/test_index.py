"""The image index: incremental updates, search, exact vs approximate, crash safety, the CLI.

Most tests use `ColourEncoder`, a deterministic hand-made encoder (image -> its 4x4
thumbnail, text colour word -> a plain image of that colour), so the logic is tested
without torch; one test indexes and searches with a real tiny DualEncoder through the CLI.
The crash tests run the indexer in a subprocess that kills itself with SIGKILL at a
named point (MULTIMODAL_INDEX_CRASH_AT), then check the index on disk and resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

from multimodal_models.errors import MultimodalError
from multimodal_models.index import ImageIndex, vectors
from multimodal_models.index.image_index import CRASH_ENV, LOCK_NAME

faiss.omp_set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230), "yellow": (230, 230, 20),
           "purple": (140, 20, 160), "white": (250, 250, 250)}
PATHS = {"red": "red.png", "green": "nested/deeper/green.png", "blue": "blue.png", "yellow": "nested/yellow.jpg",
         "purple": "purple.png", "white": "nested/deeper/white.png"}


def pixel_digest(image: Image.Image) -> str:
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()[:16]


class ColourEncoder:
    """Image -> its 4x4 RGB thumbnail (48 dims); a colour word -> a plain image of that colour.
    `log`: a file that gets one line (pixel digest) per embedded image, across processes."""

    def __init__(self, name: str = "colour-v1", log: str | os.PathLike | None = None, delay: float = 0.0):
        self.fingerprint = name
        self.log = log
        self.delay = delay  # seconds per call: gives an outside `kill -9` time to land mid-run
        self.embedded: list[str] = []

    def embed_images(self, images):
        time.sleep(self.delay)
        digests = [pixel_digest(im) for im in images]
        self.embedded += digests
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write("".join(d + "\n" for d in digests))
        return np.stack([np.asarray(im.convert("RGB").resize((4, 4), Image.BILINEAR), dtype=np.float32).ravel() / 255
                         + 0.02 for im in images])

    def embed_texts(self, texts):
        return self.embed_images([Image.new("RGB", (4, 4), COLOURS[t.split()[-1]]) for t in texts])


class FakeCaptioner:
    def __init__(self):
        self.calls = 0

    def caption_batch(self, images):
        self.calls += len(images)
        return [f"an image of {im.width}x{im.height} pixels" for im in images]


def write_image(path: Path, colour, seed: int, size: int = 16) -> Path:
    """A plain colour with a little noise: every seed gives different bytes and a different vector."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None, :] + rng.integers(-15, 16, (size, size, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def state(index: ImageIndex) -> dict[str, bytes]:
    return {e.path: e.vector.tobytes() for e in index.entries()}


@pytest.fixture
def colour_folder(tmp_path):
    folder = tmp_path / "images"
    for i, (name, colour) in enumerate(COLOURS.items()):
        write_image(folder / PATHS[name], colour, seed=i)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_image(folder / ".hidden" / "secret.png", (0, 0, 0), seed=99)
    return folder


def test_index_and_search_text_and_image(colour_folder, tmp_path):
    encoder = ColourEncoder()
    with ImageIndex.open(tmp_path / "idx", create=True) as index:
        report = index.update(colour_folder, encoder, batch_size=4, progress=False)
        assert len(index) == report.total == report.added == report.embedded == len(COLOURS)
        assert [path for path, _ in report.rejected] == ["broken.png"]
        assert "truncated or corrupt PNG" in report.rejected[0][1]
        assert report.kind == "flat" and report.generation == 1 and report.batches == 2
        assert {e.path for e in index.entries()} == set(PATHS.values())  # no .txt, no hidden folder, no broken file
        assert index.info["model_fingerprint"] == "colour-v1" and index.info["embed_dim"] == 48
        assert index.root == colour_folder.resolve()
        for name, path in PATHS.items():
            hits = index.search_text(encoder, f"a {name}", k=3)
            assert len(hits) == 3 and hits[0].path == path and hits[0].score > hits[1].score
        hits = index.search_image(encoder, colour_folder / PATHS["green"], k=10)
        assert hits[0].path == PATHS["green"] and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert len(hits) == len(COLOURS)  # k larger than the collection: all of it
        entry = next(e for e in index.entries() if e.path == PATHS["yellow"])
        assert (entry.width, entry.height) == (16, 16) and len(entry.sha256) == 64
        assert index.search_vector(entry.vector, k=1)[0].path == PATHS["yellow"]
        with pytest.raises(ValueError, match="dimension 3, the index holds dimension 48"):
            index.search_vector([1.0, 0.0, 0.0])
        assert index.verify()["files"] == len(COLOURS)
    # reopened from disk (by the images folder's name when the index lives inside it) it finds the same
    shutil.copytree(tmp_path / "idx", colour_folder / ".multimodal-index")
    with ImageIndex.open(colour_folder) as index:
        assert index.search_text(encoder, "a purple", k=1)[0].path == PATHS["purple"]


@pytest.mark.parametrize("threshold", [None, 1], ids=["exact", "approximate"])
def test_incremental_update_embeds_only_what_changed(colour_folder, tmp_path, threshold):
    encoder = ColourEncoder()
    with ImageIndex.open(tmp_path / "idx", create=True) as index:
        index.update(colour_folder, encoder, batch_size=2, approximate_threshold=threshold, progress=False)
        before = {e.path: e for e in index.entries()}
        ids = {h.path: h.id for h in index.search_vector(before["purple.png"].vector, k=10)}
        encoder.embedded.clear()

        write_image(colour_folder / "new/orange.png", (240, 140, 20), seed=50)  # added
        write_image(colour_folder / "red.png", (200, 40, 40), seed=51)  # new content, same name
        os.utime(colour_folder / "blue.png", ns=(10**18, 10**18))  # touched: same bytes, new mtime
        (colour_folder / PATHS["green"]).rename(colour_folder / "green-moved.png")  # renamed: same bytes
        (colour_folder / PATHS["white"]).unlink()  # removed
        (colour_folder / "broken.png").unlink()

        report = index.update(colour_folder, encoder, batch_size=2, progress=False)
        assert len(encoder.embedded) == report.embedded == 2  # orange and the new red; nothing else decoded twice
        assert (report.added, report.changed, report.updated, report.removed) == (2, 1, 1, 2)  # rename = add + remove
        assert report.reused == 2 and report.unchanged == 2 and report.rejected == []  # yellow, purple
        assert report.kind == ("ivf" if threshold else "flat")
        after = {e.path: e for e in index.entries()}
        assert set(after) == {"new/orange.png", "red.png", "blue.png", "green-moved.png", PATHS["yellow"], "purple.png"}
        assert after["green-moved.png"].vector.tobytes() == before[PATHS["green"]].vector.tobytes()
        assert after["blue.png"].mtime_ns == 10**18 and after["blue.png"].vector.tobytes() == before["blue.png"].vector.tobytes()
        assert after["red.png"].sha256 != before["red.png"].sha256
        assert not np.array_equal(after["red.png"].vector, before["red.png"].vector)
        new_ids = {h.path: h.id for h in index.search_vector(after["purple.png"].vector, k=10)}
        assert new_ids["purple.png"] == ids["purple.png"] and new_ids["red.png"] == ids["red.png"]  # ids are stable
        assert index.search_image(encoder, colour_folder / "red.png", k=1)[0].path == "red.png"
        assert index.search_text(encoder, "a green", k=1)[0].path == "green-moved.png"
        assert index.verify() == {"files": 6, "generation": 2, "staged": 0, "kind": report.kind}

        encoder.embedded.clear()
        report = index.update(colour_folder, encoder, progress=False)  # nothing changed: nothing read, no new generation
        assert (report.unchanged, report.embedded, report.reused, report.generation) == (6, 0, 0, 2)
        assert sorted(p.name for p in index.path.glob("vectors-*")) == ["vectors-00000002.faiss"]


def test_a_different_model_is_refused(colour_folder, tmp_path):
    with ImageIndex.open(tmp_path / "idx", create=True) as index:
        index.update(colour_folder, ColourEncoder("colour-v1"), progress=False)
        other = ColourEncoder("colour-v2")
        with pytest.raises(MultimodalError, match="built with the model 'ColourEncoder'.*different space"):
            index.update(colour_folder, other, progress=False)
        with pytest.raises(MultimodalError, match="different space"):
            index.search_text(other, "a red", k=1)
        assert other.embedded == [] and len(index) == len(COLOURS)


def test_captions_are_stored_and_added_later_without_re_embedding(colour_folder, tmp_path):
    encoder, captioner = ColourEncoder(), FakeCaptioner()
    with ImageIndex.open(tmp_path / "idx", create=True) as index:
        index.update(colour_folder, encoder, progress=False)
        assert all(e.caption is None for e in index.entries())
        encoder.embedded.clear()
        report = index.update(colour_folder, encoder, captioner=captioner, captioner_name="fake-vlm", progress=False)
        assert report.embedded == 0 and captioner.calls == report.captioned == len(COLOURS)
        assert report.updated == len(COLOURS) and report.generation == 1  # metadata only: same vectors
        assert {e.caption for e in index.entries()} == {"an image of 16x16 pixels"}
        assert index.search_text(encoder, "a red", k=1)[0].caption == "an image of 16x16 pixels"
        assert index.info["caption_model"] == "fake-vlm"
        write_image(colour_folder / "more.png", (1, 2, 3), seed=7, size=8)
        index.update(colour_folder, encoder, captioner=captioner, progress=False)
        assert captioner.calls == len(COLOURS) + 1
        assert next(e for e in index.entries() if e.path == "more.png").caption == "an image of 8x8 pixels"


def test_a_second_concurrent_update_is_refused(colour_folder, tmp_path):
    import fcntl

    with ImageIndex.open(tmp_path / "idx", create=True) as index, open(index.path / LOCK_NAME, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another process's update would
        with pytest.raises(MultimodalError, match="another update of the index"):
            index.update(colour_folder, ColourEncoder(), progress=False)


def test_open_explains_a_missing_index_and_refuses_a_foreign_folder(colour_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no image index at .*multimodal index FOLDER"):
        ImageIndex.open(tmp_path / "nothing")
    with pytest.raises(MultimodalError, match="not an empty folder"):
        ImageIndex.open(colour_folder, create=True)


def test_approximate_index_finds_the_same_top_hit_as_exact():
    rng = np.random.default_rng(0)
    n, dim = 4000, 64
    data = vectors.as_unit_rows(rng.standard_normal((n, dim)))
    ids = np.arange(100, 100 + n)  # ids are file ids, not positions
    exact = vectors.build(ids, data, dim, approximate_threshold=n + 1)
    approx = vectors.build(ids, data, dim, approximate_threshold=1000)
    assert vectors.kind_of(exact) == "flat" and vectors.kind_of(approx) == "ivf"
    nlist = faiss.extract_index_ivf(approx).nlist
    assert nlist == vectors.ivf_lists(n) == 63
    # queries near stored vectors (what searching "for this image" looks like)
    targets = rng.choice(n, 300, replace=False)
    queries = vectors.as_unit_rows(data[targets] + 0.05 * rng.standard_normal((300, dim)))
    _, exact_ids = vectors.search(exact, queries, 10)
    _, approx_ids = vectors.search(approx, queries, 10)
    assert np.array_equal(exact_ids[:, 0], ids[targets])
    assert np.array_equal(approx_ids[:, 0], exact_ids[:, 0])
    # scanning every list makes IVF exhaustive: the same top 10 for arbitrary queries
    queries = vectors.as_unit_rows(rng.standard_normal((50, dim)))
    exact_scores, exact_ids = vectors.search(exact, queries, 10)
    approx_scores, approx_ids = vectors.search(approx, queries, 10, nprobe=nlist)
    assert np.array_equal(approx_ids[:, 0], exact_ids[:, 0])
    np.testing.assert_allclose(approx_scores, exact_scores, atol=1e-5)  # (ids may swap among near-equal scores)
    assert np.mean([len(set(a) & set(e)) for a, e in zip(approx_ids, exact_ids)]) >= 9.9
    # patched (remove + add) the way an update patches it, it still agrees with a rebuild
    vectors.remove(approx, ids[:500])
    vectors.add(approx, ids[:100], data[:100])
    assert approx.ntotal == n - 400
    assert sorted(vectors.stored_ids(approx)) == sorted(np.concatenate([ids[:100], ids[500:]]))


def test_batched_flat_search_uses_blas():
    # faiss-cpu 1.15's default threshold (128000) would send every batch down the slow path
    assert faiss.cvar.distance_compute_blas_threshold == vectors.BLAS_THRESHOLD <= 16


# --- crash safety ---------------------------------------------------------------------------------

CRASH_POINTS = ["batch:2", "before-publish", "after-publish", "faiss-tmp", "faiss-replaced"]
# IVF-PQ also writes its float16 re-ranking file (rerank-<generation>.f16) before the FAISS file
IVFPQ_CRASH_POINTS = [*CRASH_POINTS[:3], "rerank-tmp", "rerank-replaced", *CRASH_POINTS[3:]]


def update_command(folder: Path, index: Path, log: Path, delay: float = 0.0) -> list[str]:
    """`ImageIndex.update` with a logging ColourEncoder, as a command for a fresh process."""
    code = ("import sys; from tests.test_index import ColourEncoder; from multimodal_models.index import ImageIndex; "
            "ImageIndex.open(sys.argv[2], create=True).update(sys.argv[1], ColourEncoder(log=sys.argv[3], "
            "delay=float(sys.argv[4])), batch_size=2, progress=False)")
    return [sys.executable, "-c", code, str(folder), str(index), str(log), str(delay)]


def subprocess_env(crash: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    if crash:
        env[CRASH_ENV] = crash
    return env


def run_update_subprocess(folder: Path, index: Path, log: Path, crash: str | None) -> subprocess.CompletedProcess:
    """The update in a fresh process, killed by SIGKILL at the named point `crash` (None: not killed)."""
    return subprocess.run(update_command(folder, index, log), cwd=REPO, env=subprocess_env(crash),
                          capture_output=True, text=True, timeout=120)


def logged(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


@pytest.fixture(scope="module")
def crash_scenario(tmp_path_factory):
    """An index of 6 images; then the folder changes (7 added, 1 changed, 1 removed: 8 to embed,
    4 batches of 2); `reference` is that update done without interruption."""
    return make_crash_scenario(tmp_path_factory.mktemp("crash"))


@pytest.fixture(scope="module")
def crash_scenario_ivfpq(tmp_path_factory):
    """The same with an IVF-PQ index (named when it was created; the updates keep it)."""
    return make_crash_scenario(tmp_path_factory.mktemp("crash-ivfpq"), index_type="ivfpq")


def make_crash_scenario(root: Path, index_type: str | None = None) -> dict:
    folder = root / "images"
    for i in range(6):
        write_image(folder / f"old/{i}.png", (40 * i, 100, 200), seed=i)
    base = root / "base"
    with ImageIndex.open(base, create=True) as index:
        index.update(folder, ColourEncoder(), batch_size=2, index_type=index_type, progress=False)
        old = state(index)
    for i in range(7):
        write_image(folder / f"new/{i}.png", (200, 30 * i, 50), seed=100 + i)
    write_image(folder / "old/0.png", (0, 0, 0), seed=200)
    (folder / "old/5.png").unlink()
    changed = {pixel_digest(Image.open(folder / p)) for p in [*(f"new/{i}.png" for i in range(7)), "old/0.png"]}
    shutil.copytree(base, root / "reference")
    with ImageIndex.open(root / "reference") as index:
        index.update(folder, ColourEncoder(), batch_size=2, progress=False)
        new, generation = state(index), index.info["generation"]
    assert old != new and len(new) == 12
    return {"root": root, "folder": folder, "base": base, "old": old, "new": new, "generation": generation,
            "changed": changed, "kind": index_type or "flat"}


@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_kill_9_leaves_a_consistent_index_and_the_rerun_resumes(crash_scenario, crash):
    check_kill_9_and_resume(crash_scenario, crash)


@pytest.mark.parametrize("crash", IVFPQ_CRASH_POINTS)
def test_kill_9_of_an_ivfpq_index_leaves_it_consistent_and_the_rerun_resumes(crash_scenario_ivfpq, crash):
    """The compressed type is patched (remove + add) and written the same way: the same guarantees."""
    check_kill_9_and_resume(crash_scenario_ivfpq, crash)


def check_kill_9_and_resume(s: dict, crash: str) -> None:
    work = s["root"] / f"run-{crash.replace(':', '-')}"
    index_dir = work / "index"
    shutil.copytree(s["base"], index_dir)
    first, second = work / "embedded-1.log", work / "embedded-2.log"

    result = run_update_subprocess(s["folder"], index_dir, first, crash)
    assert result.returncode == -9, result.stderr  # killed by SIGKILL, at the named point

    # what a reader would find now (inspected on a copy, so the rerun starts from the crashed files)
    shutil.copytree(index_dir, work / "inspect")
    with ImageIndex.open(work / "inspect") as index:
        summary = index.verify()
        assert summary["kind"] == s["kind"]
        published = crash not in ("batch:2", "before-publish")
        assert state(index) == (s["new"] if published else s["old"])  # the old index or the new one, not a mix
        for entry in index.entries():  # and searchable: each image finds itself
            assert index.search_vector(entry.vector, k=1)[0].path == entry.path
        if s["kind"] == "ivfpq":  # re-ranked from a float16 file of this generation (found valid, or rebuilt)
            check_rerank_file(index)
        assert summary["staged"] == {"batch:2": 4, "before-publish": 8}.get(crash, 0)

    done_before = logged(first)
    assert len(done_before) == (4 if crash == "batch:2" else 8)  # batches committed before the kill
    result = run_update_subprocess(s["folder"], index_dir, second, None)
    assert result.returncode == 0, result.stderr
    redone = logged(second)
    assert not set(redone) & set(done_before)  # finished batches were not embedded again
    assert sorted(done_before + redone) == sorted(s["changed"])  # and everything was embedded exactly once

    with ImageIndex.open(index_dir) as index:
        assert state(index) == s["new"]  # equal to the uninterrupted run: same paths, same vectors
        assert index.info["generation"] == s["generation"]
        assert index.verify() == {"files": 12, "generation": s["generation"], "staged": 0, "kind": s["kind"]}
        if s["kind"] == "ivfpq":
            check_rerank_file(index)
    leftovers = sorted(p.name for p in index_dir.iterdir() if p.name.startswith((".", "vectors-", "rerank-")))
    assert leftovers == ([f"rerank-{s['generation']:08d}.f16"] if s["kind"] == "ivfpq" else []) + \
        [f"vectors-{s['generation']:08d}.faiss"]


def check_rerank_file(index: ImageIndex) -> None:
    """The index searched with its generation's float16 file, which holds every file's vector."""
    from multimodal_models.index import halfvectors

    generation = index.info["generation"]
    entry = next(index.entries())
    assert index.search_vector(entry.vector, k=1)[0].path == entry.path
    half = index._half
    assert half is not None and index._half_generation == generation
    assert half.path.name == f"rerank-{generation:08d}.f16" and half.path.exists()
    entries = {e.path: e.vector for e in index.entries()}
    ids = {p: i for i, p in index._conn.execute("SELECT id, path FROM files")}
    assert sorted(half.ids) == sorted(ids.values())
    for path, vector in entries.items():
        np.testing.assert_allclose(half.fetch([ids[path]])[0], vector, atol=1e-3)
    assert half.path.stat().st_size == halfvectors.expected_size(len(vector), len(entries))


# --- a real tiny dual encoder, through the CLI ---------------------------------------------------


def test_cli_index_and_search_with_a_tiny_dual_encoder(tmp_path, capsys):
    import torch

    from multimodal_models.cli import main
    from tests.test_dual_encoder import random_images, tiny_model

    torch.set_num_threads(1)
    model_dir = tiny_model().save_pretrained(tmp_path / "model")
    folder = tmp_path / "photos"
    for i, image in enumerate(random_images(5, seed=3)):
        (folder / ("a" if i < 3 else "b")).mkdir(parents=True, exist_ok=True)
        image.save(folder / ("a" if i < 3 else "b") / f"{i}.png")

    assert main(["index", str(folder), "--model", str(model_dir), "--batch-size", "2", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["added"] == report["embedded"] == report["total"] == 5 and report["batches"] == 3
    assert report["index"] == str((folder / ".multimodal-index").resolve())

    # by image: that image comes first with cosine 1; the model is the one recorded in the index
    assert main(["search", str(folder), "--image", str(folder / "b/4.png"), "-k", "3", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["rank"] for line in lines] == [1, 2, 3]
    assert lines[0]["path"] == "b/4.png" and lines[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert lines[0]["file"] == str(folder.resolve() / "b/4.png")
    # by text: scores are the model's cosines, best first
    assert main(["search", str(folder / ".multimodal-index"), "a red circle", "-k", "5"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 5 and [float(r[0]) for r in rows] == sorted((float(r[0]) for r in rows), reverse=True)
    model = tiny_model()
    texts = model.embed_texts(["a red circle"]).numpy()
    with ImageIndex.open(folder) as index:
        best = max(index.entries(), key=lambda e: float(e.vector @ texts[0]))
        assert rows[0][1].endswith(best.path)
        assert index.search_text(model, "a red circle", k=1)[0].path == best.path

    # rerun: nothing to do; with --caption: captions added by a (tiny) VLM, nothing embedded again
    assert main(["index", str(folder), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["unchanged"] == 5
    from tests.test_vlm import tiny_vlm

    vlm_dir = tiny_vlm().save_pretrained(tmp_path / "vlm")
    assert main(["index", str(folder), "--caption", "--caption-model", str(vlm_dir), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["captioned"], report["embedded"], report["updated"]) == (5, 0, 5)
    assert main(["search", str(folder), "--image", str(folder / "a/0.png"), "-k", "1", "--json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["caption"], str)
    # another model: refused with a one-line error
    other = tiny_model(seed=1).save_pretrained(tmp_path / "other")
    assert main(["index", str(folder), "--model", str(other), "--quiet"]) == 2
    assert "embeds into a different space" in capsys.readouterr().err
    assert main(["search", str(folder)]) == 2
    assert "give a text query, --image IMG, or both" in capsys.readouterr().err


def test_kill_9_from_outside_mid_batch(crash_scenario):
    """Killed from outside while a batch is being embedded (not at a hook): same guarantees;
    at most the one uncommitted batch is embedded again."""
    s = crash_scenario
    work = s["root"] / "run-outside"
    index_dir = work / "index"
    shutil.copytree(s["base"], index_dir)
    first, second = work / "embedded-1.log", work / "embedded-2.log"
    process = subprocess.Popen(update_command(s["folder"], index_dir, first, delay=0.3), cwd=REPO, env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(logged(first)) < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.15)  # the second batch is embedded (and committed, unless the machine is very busy); the third is in progress
    process.kill()  # SIGKILL
    process.wait(timeout=30)
    assert process.returncode == -9, process.stderr.read()

    with ImageIndex.open(index_dir) as index:
        staged = index.verify()["staged"]
        assert state(index) == s["old"]
    assert staged in (2, 4, 6) and len(logged(first)) >= staged  # a batch may have been embedded, not committed
    result = subprocess.run(update_command(s["folder"], index_dir, second), cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(logged(second)) == 8 - staged  # only what no committed batch held
    assert set(logged(first)) | set(logged(second)) == s["changed"]
    with ImageIndex.open(index_dir) as index:
        assert state(index) == s["new"] and index.verify()["staged"] == 0
