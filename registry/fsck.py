"""`berth fsck`: re-hash every blob and reconcile the catalog with the blob store.

Findings, and what `repair` does about each:
- a blob whose bytes no longer match its name: deleted (the models using it are reported, since
  they need pulling or creating again);
- a catalog blob row whose file is missing: reported with the models that need it;
- a blob file the catalog does not know: deleted once older than an hour (leftover of a crash);
- a stale temporary file of a killed writer: deleted;
- a manifest row whose bytes do not hash to its digest, or a name pointing at no manifest: the
  name is removed (its blobs then fall to GC).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import delete, select

from berth.registry.catalog.schema import BlobRow, LayerRow, ManifestRow, TagRow
from berth.registry.digest import Digest
from berth.registry.library import Library, utcnow
from berth.registry.names import ModelName

# Files younger than this may belong to an upload in progress in another process.
ORPHAN_GRACE_SECONDS = 3600


@dataclass
class FsckReport:
    checked_blobs: int = 0
    checked_bytes: int = 0
    corrupt_blobs: list[Digest] = field(default_factory=list)
    missing_blobs: list[Digest] = field(default_factory=list)
    orphan_files: list[Digest] = field(default_factory=list)
    stale_temp_files: int = 0
    broken_names: list[str] = field(default_factory=list)
    affected_models: set[str] = field(default_factory=set)
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not (self.corrupt_blobs or self.missing_blobs or self.orphan_files or self.broken_names)


def fsck(library: Library, repair: bool = False) -> FsckReport:
    report = FsckReport(repaired=repair)
    known = library.referenced_blobs()
    on_disk = set(library.blobs.stored_digests())

    for digest, size in sorted(known.items()):
        if digest not in on_disk:
            report.missing_blobs.append(digest)
            continue
        report.checked_blobs += 1
        report.checked_bytes += library.blobs.size(digest)
        if library.blobs.hash_file(digest) != digest:
            report.corrupt_blobs.append(digest)
        else:
            with library.session() as session:
                row = session.get(BlobRow, str(digest))
                if row is not None:
                    row.verified_at = utcnow()
    report.orphan_files = sorted(on_disk - set(known))
    bad = {str(d) for d in report.corrupt_blobs + report.missing_blobs}

    with library.session() as session:
        for tag in session.scalars(select(TagRow)).all():
            display = ModelName(tag.host, tag.namespace, tag.model, tag.tag).display
            manifest = session.get(ManifestRow, tag.manifest_digest)
            if manifest is None or str(Digest.of_bytes(manifest.raw)) != manifest.digest:
                report.broken_names.append(display)
                continue
            used = session.scalars(select(LayerRow.blob_digest).where(LayerRow.manifest_digest == manifest.digest))
            if bad.intersection(used):
                report.affected_models.add(display)

    if repair:
        _repair(library, report)
    return report


def _repair(library: Library, report: FsckReport) -> None:
    report.stale_temp_files = len(library.blobs.sweep_temp_files())
    with library.session() as session:
        for display in report.broken_names:
            session.execute(delete(TagRow).where(TagRow.name_key == ModelName.parse(display).key))
    for digest in report.corrupt_blobs:
        # Drop the bad bytes; the models that used them stay listed as needing a re-pull.
        library.blobs.remove(digest)
    cutoff = time.time() - ORPHAN_GRACE_SECONDS
    for digest in report.orphan_files:
        path = library.blobs.path(digest)
        # A create or upload in another process may have just written it and not tagged it yet.
        if path.exists() and path.stat().st_mtime < cutoff:
            library.blobs.remove(digest)
    library.collect_garbage()
