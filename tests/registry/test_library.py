"""The catalog and library: migrations, tagging in one transaction, copy, delete and GC."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from berth import migrations

from berth.registry.builder import ModelBuilder
from berth.registry.catalog import database
from berth.registry.digest import Digest
from berth.registry.errors import BlobNotFound, InvalidInput, ModelNotFound, SchemaTooNew
from berth.registry.fsck import fsck
from berth.registry.library import Library
from berth.registry.manifest import DOCKER_CONFIG, MODEL_LAYER, SYSTEM_LAYER, Descriptor, Manifest, ModelConfig
from berth.registry.names import ModelName


def make_model(library: Library, name: str, weights: bytes, system: str | None = None) -> Manifest:
    stored = library.blobs.write_bytes(weights)
    builder = ModelBuilder(library)
    builder.add_blob(MODEL_LAYER, stored.digest, stored.size)
    if system is not None:
        builder.add_text(SYSTEM_LAYER, system)
    manifest, _ = builder.commit(ModelName.parse(name), ModelConfig(model_family="test", model_type="1K"))
    return manifest


def blob_files(library: Library) -> set[Digest]:
    return set(library.blobs.stored_digests())


def test_migrations_create_the_schema_from_empty(tmp_path: Path) -> None:
    engine = database.open_engine(tmp_path)
    database.upgrade(engine)
    tables = set(inspect(engine).get_table_names())
    assert {"blobs", "manifests", "layers", "tags", "alembic_version"} <= tables
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == migrations.HEAD
    database.upgrade(engine)  # idempotent
    engine.dispose()


def test_head_constant_matches_the_migration_scripts() -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(database.alembic_config("sqlite://"))
    assert script.get_heads() == [migrations.HEAD]


def test_a_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    Library(tmp_path).close()
    db = tmp_path / database.CATALOG_FILE
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_future'")
    before = db.read_bytes()
    with pytest.raises(SchemaTooNew, match="newer Berth"):
        Library(tmp_path)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("9999_future",)
    assert db.read_bytes() == before


def test_tag_list_get_and_case_insensitive_lookup(library: Library) -> None:
    manifest = make_model(library, "Demo:1", b"weights-1", system="be brief")
    models = library.list()
    assert [m.name.display for m in models] == ["Demo:1"]
    assert library.get("demo:1").manifest.digest == manifest.digest
    assert library.get("DEMO:1").name.model == "Demo"
    assert library.get("demo:1").manifest.raw == manifest.raw  # bytes kept exactly
    with pytest.raises(ModelNotFound, match="model 'nope' not found"):
        library.get("nope")


def test_retagging_under_other_case_keeps_the_stored_spelling_and_moves_the_name(library: Library) -> None:
    first = make_model(library, "Demo:Latest", b"weights-a")
    second = make_model(library, "demo:latest", b"weights-b")  # the same name, case aside
    assert [m.name.display for m in library.list()] == ["Demo:Latest"]
    assert library.get("DEMO:LATEST").manifest.digest == second.digest != first.digest
    # Tagging a manifest the catalog already has adds no second copy of its rows.
    library.copy(ModelName.parse("demo:latest"), ModelName.parse("other:1"))
    assert library.get("other:1").manifest.raw == second.raw
    assert sorted(library.referenced_blobs()) == sorted({d.digest for d in second.blobs()})


def test_two_processes_tagging_the_same_new_manifest_at_once_both_succeed(tmp_path: Path) -> None:
    """Two servers (or a server and `berth`) on one store pull the same model: both tag it. Two
    Library objects stand for the two processes (each has its own SQLite connections)."""
    import threading

    first, second = Library(tmp_path), Library(tmp_path)
    config = first.blobs.write_bytes(ModelConfig(model_family="test", model_type="1K").to_bytes())
    manifests = []
    for i in range(15):
        weights = first.blobs.write_bytes(f"weights {i}".encode())
        manifests.append(Manifest.build(Descriptor(DOCKER_CONFIG, config.digest, config.size),
                                        [Descriptor(MODEL_LAYER, weights.digest, weights.size)]))
    errors: list[BaseException] = []

    def tag_all(library: Library, barrier: threading.Barrier) -> None:
        for i, manifest in enumerate(manifests):
            barrier.wait()
            try:
                library.tag(ModelName.parse(f"m{i}:latest"), manifest)
            except BaseException as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=tag_all, args=(lib, barrier)) for lib in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(m.name.display for m in second.list()) == sorted(f"m{i}:latest" for i in range(15))
    assert all(second.get(f"m{i}:latest").manifest.digest == manifests[i].digest for i in range(15))
    first.close()
    second.close()


def test_copy_shares_blobs_and_delete_collects_only_unused_ones(library: Library) -> None:
    manifest = make_model(library, "a:1", b"shared-weights")
    library.copy(ModelName.parse("a:1"), ModelName.parse("b:1"))
    assert sorted(m.name.display for m in library.list()) == ["a:1", "b:1"]
    before = blob_files(library)
    report = library.delete(ModelName.parse("a:1"))
    assert report.blobs == () and blob_files(library) == before  # still used by b:1
    report = library.delete(ModelName.parse("b:1"))
    assert set(report.blobs) == {d.digest for d in manifest.blobs()}
    assert report.bytes_freed == manifest.size
    assert blob_files(library) == set()
    assert library.list() == []


def test_retagging_collects_what_only_the_old_manifest_used(library: Library) -> None:
    old = make_model(library, "m:1", b"old-weights", system="old")
    new = make_model(library, "m:1", b"new-weights", system="new")
    assert library.get("m:1").manifest.digest == new.digest
    old_only = {d.digest for d in old.blobs()} - {d.digest for d in new.blobs()}
    assert old_only and not (old_only & blob_files(library))


def test_pinned_blobs_survive_gc(library: Library) -> None:
    make_model(library, "m:1", b"pinned-weights")
    digest = library.get("m:1").manifest.layers[0].digest
    with library.pinned([digest]):
        library.delete(ModelName.parse("m:1"))
        assert library.blobs.exists(digest)
        assert library.collect_garbage().blobs == ()
    # Once unpinned and still unreferenced, the next collection takes it.
    assert digest in library.collect_garbage().blobs
    assert not library.blobs.exists(digest)


def test_tag_refuses_a_manifest_whose_blobs_are_missing(library: Library) -> None:
    missing = Descriptor(MODEL_LAYER, Digest("2" * 64), 10)
    config = library.blobs.write_bytes(b"{}")
    manifest = Manifest.build(Descriptor(DOCKER_CONFIG, config.digest, config.size), [missing])
    with pytest.raises(BlobNotFound):
        library.tag(ModelName.parse("broken:1"), manifest)
    assert library.list() == []


def test_tag_refuses_a_size_that_does_not_match(library: Library) -> None:
    blob = library.blobs.write_bytes(b"12345")
    config = library.blobs.write_bytes(b"{}")
    manifest = Manifest.build(Descriptor(DOCKER_CONFIG, config.digest, config.size),
                              [Descriptor(MODEL_LAYER, blob.digest, 999)])
    with pytest.raises(InvalidInput, match="999"):
        library.tag(ModelName.parse("broken:1"), manifest)
    assert library.list() == []


def test_fsck_finds_and_repairs_a_corrupted_blob(library: Library) -> None:
    manifest = make_model(library, "m:1", b"good-weights")
    assert fsck(library).clean
    weights = manifest.layers[0].digest
    library.blobs.path(weights).write_bytes(b"bad-weights!")
    report = fsck(library)
    assert report.corrupt_blobs == [weights] and report.affected_models == {"m:1"}
    fsck(library, repair=True)
    assert not library.blobs.exists(weights)
    report = fsck(library)
    assert report.missing_blobs == [weights] and "m:1" in report.affected_models


def test_manifest_parse_rejects_hostile_documents() -> None:
    good_layer = {"mediaType": MODEL_LAYER, "digest": "sha256:" + "a" * 64, "size": 1}
    config = {"mediaType": DOCKER_CONFIG, "digest": "sha256:" + "b" * 64, "size": 2}

    def doc(**overrides: object) -> bytes:
        import json

        base = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": config, "layers": [good_layer]}
        base.update(overrides)
        return json.dumps(base).encode()

    assert Manifest.parse(doc()).layers[0].size == 1
    bad_digest = {**good_layer, "digest": "sha256:../../../../etc/passwd"}
    for raw, message in [
        (doc(layers=[bad_digest]), "invalid digest format"),
        (doc(layers=[{**good_layer, "digest": ""}]), "invalid digest format"),
        (doc(layers=[{**good_layer, "size": -1}]), "invalid size"),
        (doc(layers=[{**good_layer, "size": "1"}]), "invalid size"),
        (doc(schemaVersion=1), "schemaVersion"),
        (doc(mediaType="text/html"), "media type"),
        (b"not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b" " * (5 * 1024 * 1024), "limit"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            Manifest.parse(raw)


def test_catalog_version_changes_with_every_write_from_any_process(library: Library) -> None:
    make_model(library, "v:1", b"weights-v")
    version = library.catalog_version()
    library.list(), library.get("v:1"), library.names()
    assert library.catalog_version() == version  # reading changes nothing
    library.copy(ModelName.parse("v:1"), ModelName.parse("w:1"))
    after_copy = library.catalog_version()
    assert after_copy != version
    # Another process (a second server, `berth` run on the store) deletes a model.
    script = ("import sys; from pathlib import Path; from berth.registry.library import Library; "
              "from berth.registry.names import ModelName; "
              "Library(Path(sys.argv[1])).delete(ModelName.parse('w:1'))")
    subprocess.run([sys.executable, "-c", script, str(library.root)], check=True,
                   cwd=Path(__file__).resolve().parents[2])
    assert library.catalog_version() != after_copy
    assert [m.name.display for m in library.list()] == ["v:1"]
