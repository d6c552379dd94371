"""The LUNA16 candidate index: CSVs merged into one table of positives and negatives, split by series.

Columns are numpy arrays rather than one object per row: the real candidates.csv has 551,065
rows and the index must build in about a second.
"""

from __future__ import annotations

import csv
import gc
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from p2ch_app.data.ct import series_on_disk
from p2ch_app.errors import UserError

CANDIDATES_CSV = "candidates.csv"
ANNOTATIONS_CSV = "annotations.csv"
MALIGNANCY_CSV = "annotations_with_malignancy.csv"
EXCLUDED_CSV = "annotations_excluded.csv"  # optional: findings the LUNA16 evaluation ignores
_XYZ = ["coordX", "coordY", "coordZ"]
_MATCH_MM = 1e-3  # malignancy rows repeat the annotation coordinates, up to float formatting


# Values of LunaIndex.malignancy: one meaning each
MALIGNANT, BENIGN, UNKNOWN_MALIGNANCY, NOT_A_NODULE = 1, 0, -1, -2


@dataclass(eq=False)
class LunaIndex:
    series_uids: list[str]  # sorted; series_code indexes into it
    series_code: np.ndarray  # (N,) int32
    center_xyz: np.ndarray  # (N, 3) float64 mm
    is_nodule: np.ndarray  # (N,) bool
    has_annotation: np.ndarray  # (N,) bool
    diameter_mm: np.ndarray  # (N,) float64
    malignancy: np.ndarray  # (N,) int8: MALIGNANT, BENIGN, UNKNOWN_MALIGNANCY (a nodule) or NOT_A_NODULE
    line: np.ndarray  # (N,) int32: 1-based line in annotations.csv (annotated) or candidates.csv (the others)
    mined: np.ndarray  # (N,) bool: a look-alike found by a U-Net (luna-train-cls --mine-with), from no CSV

    def __len__(self) -> int:
        return len(self.series_code)

    def _columns(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "series_uids"}

    def uids(self) -> np.ndarray:
        """Series UID of every row."""
        return np.asarray(self.series_uids, dtype=object)[self.series_code]

    def select(self, keep: np.ndarray) -> LunaIndex:
        """The rows where `keep` (bool mask or indices) holds, with the series list trimmed to match."""
        columns = {name: values[keep] for name, values in self._columns().items()}
        used = np.unique(columns["series_code"])
        remap = np.full(len(self.series_uids), -1, np.int32)
        remap[used] = np.arange(len(used), dtype=np.int32)
        columns["series_code"] = remap[columns["series_code"]]
        return LunaIndex([self.series_uids[c] for c in used], **columns)

    def with_mined(self, series_code: np.ndarray, center_xyz: np.ndarray,
                   is_nodule: np.ndarray | None = None) -> LunaIndex:
        """This index plus mined rows at these centres of its series (line 0: from no file): non-nodules,
        or where is_nodule holds, nodules of unknown malignancy."""
        n = len(series_code)
        is_nodule = np.zeros(n, bool) if is_nodule is None else np.asarray(is_nodule, bool)
        added = dict(series_code=np.asarray(series_code, np.int32),
                     center_xyz=np.asarray(center_xyz, float).reshape(-1, 3), is_nodule=is_nodule,
                     has_annotation=np.zeros(n, bool), diameter_mm=np.zeros(n),
                     malignancy=np.where(is_nodule, UNKNOWN_MALIGNANCY, NOT_A_NODULE).astype(np.int8),
                     line=np.zeros(n, np.int32), mined=np.ones(n, bool))
        return LunaIndex(self.series_uids, **{name: np.concatenate([values, added[name].astype(values.dtype)])
                                              for name, values in self._columns().items()})

    def for_series(self, uid: str) -> LunaIndex:
        code = self.series_uids.index(uid) if uid in self.series_uids else -1
        return self.select(self.series_code == code)

    def validation_series(self, val_stride: int = 10) -> np.ndarray:
        """Per series (in series_uids order): whether it validates. Every val_stride-th series
        (sorted by UID) does, so a series is never in both sets."""
        if val_stride < 2:
            raise UserError(f"val_stride must be at least 2, got {val_stride}")
        return np.arange(len(self.series_uids)) % val_stride == 0

    def is_validation(self, val_stride: int = 10) -> np.ndarray:
        """Per row: whether its series validates."""
        return self.validation_series(val_stride)[self.series_code]



def build_index(data_root: Path, require_on_disk: bool = True) -> LunaIndex:
    """Read and merge the LUNA16 CSVs under data_root.

    Positives are the annotated nodules (diameter, malignancy when the malignancy file has it);
    class-0 candidates are the negatives; a class-1 candidate within an annotation's radius is
    that annotation and is dropped, any other class-1 candidate stays a positive of unknown size.
    """
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise UserError(f"data root {data_root} does not exist; pass --data-root DIR or run luna-synth first")
    cand = _read_csv(data_root / CANDIDATES_CSV, ["seriesuid", *_XYZ, "class"])
    ann = _read_csv(data_root / ANNOTATIONS_CSV, ["seriesuid", *_XYZ, "diameter_mm"])
    cand_xyz = _numeric(cand, _XYZ)
    cand_class = _numeric(cand, ["class"])[:, 0]
    bad = np.flatnonzero((cand_class != 0) & (cand_class != 1))
    if len(bad):
        _fail(cand, bad[0], "class", "is not 0 or 1")
    ann_xyz = _numeric(ann, _XYZ)
    ann_diam = _numeric(ann, ["diameter_mm"])[:, 0]
    bad = np.flatnonzero(ann_diam <= 0)
    if len(bad):
        _fail(ann, bad[0], "diameter_mm", "is not a positive diameter")
    ann_mal = np.full(len(ann_diam), UNKNOWN_MALIGNANCY, np.int8)
    if (data_root / MALIGNANCY_CSV).exists():
        _attach_malignancy(_read_csv(data_root / MALIGNANCY_CSV, ["seriesuid", *_XYZ, "mal_bool"]),
                           ann["seriesuid"], ann_xyz, ann_mal)

    keep = _unmatched_class1(cand["seriesuid"], cand_xyz, cand_class, ann["seriesuid"], ann_xyz, ann_diam)
    keep |= cand_class == 0
    n_ann, rows = len(ann_diam), np.flatnonzero(keep)
    series_uids, codes = _factorize(list(ann["seriesuid"]) + list(cand["seriesuid"]))
    codes = np.concatenate([codes[:n_ann], codes[n_ann:][rows]])
    table = dict(
        center_xyz=np.concatenate([ann_xyz, cand_xyz[rows]]),
        is_nodule=np.concatenate([np.ones(n_ann, bool), cand_class[rows] == 1]),
        has_annotation=np.concatenate([np.ones(n_ann, bool), np.zeros(len(rows), bool)]),
        diameter_mm=np.concatenate([ann_diam, np.zeros(len(rows))]),
        malignancy=np.concatenate([ann_mal, np.where(cand_class[rows] == 1, UNKNOWN_MALIGNANCY,
                                                     NOT_A_NODULE).astype(np.int8)]),
        line=np.concatenate([ann["_line"], cand["_line"][rows]]).astype(np.int32),
        mined=np.zeros(n_ann + len(rows), bool),
    )
    # Series in order, nodules first within a series, then file order: stable for every run.
    order = np.lexsort((~table["has_annotation"], ~table["is_nodule"], codes))
    index = LunaIndex(series_uids, codes[order], **{k: v[order] for k, v in table.items()})
    if not require_on_disk:
        return index
    on_disk = series_on_disk(data_root)
    present = np.array([u in on_disk for u in series_uids], bool)[index.series_code]
    if not present.any():
        raise UserError(f"none of the series in {data_root / CANDIDATES_CSV} is on disk as "
                        f"{data_root}/subset*/<uid>.mhd; check --data-root")
    return index.select(present)


@dataclass(frozen=True, eq=False)
class ExcludedFindings:
    """annotations_excluded.csv: findings that are neither nodules to find nor false positives (LUNA16's
    irrelevant findings: nodules under 3 mm, non-nodules, nodules accepted by only 1 or 2 radiologists)."""

    by_series: dict[str, tuple[np.ndarray, np.ndarray]]  # uid -> (centres (K, 3) mm, diameters (K,) mm)

    def for_series(self, uid: str) -> tuple[np.ndarray, np.ndarray]:
        """(centres, diameters) of one series; a negative diameter means the file gives no size."""
        return self.by_series.get(uid, (np.zeros((0, 3)), np.zeros(0)))


def read_excluded(data_root: Path) -> ExcludedFindings:
    """The excluded findings of annotations_excluded.csv under data_root, by series; none when the file is
    absent. Diameters are kept as written: LUNA16's file has -1 where a finding has no size (its evaluation
    then uses 10 mm, see evaluation/scoring.py)."""
    path = Path(data_root) / EXCLUDED_CSV
    if not path.exists():
        return ExcludedFindings({})
    table = _read_csv(path, ["seriesuid", *_XYZ, "diameter_mm"], allow_empty=True)
    xyz, diameter = _numeric(table, _XYZ), _numeric(table, ["diameter_mm"])[:, 0]
    return ExcludedFindings({uid: (xyz[rows], diameter[rows]) for uid, rows in _by_series(table["seriesuid"]).items()})


def _read_csv(path: Path, columns: list[str], allow_empty: bool = False) -> dict:
    """Columns of a CSV (lists of strings) plus '_line', the 1-based file line of each row. allow_empty:
    a header without rows is an empty table (else refused)."""
    if not path.is_file():
        raise UserError(f"{path} is missing; a LUNA16 data root holds {CANDIDATES_CSV} and "
                        f"{ANNOTATIONS_CSV} (run luna-synth for a synthetic one)")
    text = path.read_text(encoding="utf-8-sig", errors="replace")  # a spreadsheet may write a byte-order mark
    with _gc_paused():
        lines = text.splitlines()
        numbers = range(1, len(lines) + 1)
        if "" in lines:
            numbers = [i + 1 for i, line in enumerate(lines) if line]
            lines = [lines[n - 1] for n in numbers]
        # Plain str.split is ~2x faster than the csv module; quoted fields need the real parser.
        rows = list(csv.reader(lines)) if '"' in text else [line.split(",") for line in lines]
    if not rows:
        raise UserError(f"{path} is empty; it needs the header {','.join(columns)} and data rows")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in columns if c not in header]
    if missing:
        raise UserError(f"{path}:{numbers[0]}: header lacks column(s) {', '.join(missing)}; "
                        f"expected {','.join(columns)}")
    body = rows[1:]
    if not body and not allow_empty:
        raise UserError(f"{path} has a header but no rows; fill it or remove the file")
    table = {"_path": path, "_line": np.array(numbers[1:], np.int64)}
    width = len(header)
    if not body:
        return {**table, **{c: () for c in columns}}
    if min(map(len, body)) < width:
        short = next(i for i, r in enumerate(body) if len(r) < width)
        raise UserError(f"{path}:{table['_line'][short]}: row has {len(body[short])} fields, expected "
                        f"{width}; fix or remove the row")
    with _gc_paused():
        by_column = list(zip(*body))
    for c in columns:
        table[c] = by_column[header.index(c)]
    if " " in text or "\t" in text:
        table["seriesuid"] = [u.strip() for u in table["seriesuid"]]
    return table


@contextmanager
def _gc_paused():
    """Millions of small strings make the cyclic GC run over and over; nothing here forms cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _numeric(table: dict, columns: list[str]) -> np.ndarray:
    out = np.empty((len(table["_line"]), len(columns)))
    for j, c in enumerate(columns):
        try:
            out[:, j] = np.fromiter(map(float, table[c]), np.float64, out.shape[0])
        except ValueError:
            for i, s in enumerate(table[c]):  # slow path, only to name the bad row
                try:
                    float(s)
                except ValueError:
                    _fail(table, i, c, "is missing" if not s.strip() else f"'{s.strip()}' is not a number")
        bad = np.flatnonzero(~np.isfinite(out[:, j]))
        if len(bad):
            _fail(table, bad[0], c, f"'{table[c][bad[0]].strip()}' is not a finite number")
    return out


def _fail(table: dict, row: int, column: str, problem: str):
    raise UserError(f"{table['_path']}:{table['_line'][row]}: field {column} {problem}; fix or remove the row")


def _factorize(uids: list[str]) -> tuple[list[str], np.ndarray]:
    """(sorted distinct UIDs, code of each row); a dict beats np.unique on strings by ~20x."""
    distinct = sorted(set(uids))
    code_of = {u: i for i, u in enumerate(distinct)}
    return distinct, np.fromiter(map(code_of.__getitem__, uids), np.int32, len(uids))


def _by_series(uids: list[str]) -> dict[str, np.ndarray]:
    distinct, codes = _factorize(uids)
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(len(distinct)))
    return dict(zip(distinct, np.split(order, starts[1:])))


def _attach_malignancy(mal: dict, ann_uids, ann_xyz, ann_mal) -> None:
    flags = mal["mal_bool"]
    bad = [i for i, f in enumerate(flags) if f.strip() not in ("True", "False")]
    if bad:
        _fail(mal, bad[0], "mal_bool", f"'{flags[bad[0]].strip()}' is not True or False")
    mal_xyz = _numeric(mal, _XYZ)
    ann_rows = _by_series(ann_uids)
    for i, uid in enumerate(mal["seriesuid"]):
        rows = ann_rows.get(uid)
        if rows is None:
            continue
        dist = np.linalg.norm(ann_xyz[rows] - mal_xyz[i], axis=1)
        if dist.min() <= _MATCH_MM:
            ann_mal[rows[dist.argmin()]] = MALIGNANT if flags[i].strip() == "True" else BENIGN


def _unmatched_class1(cand_uids, cand_xyz, cand_class, ann_uids, ann_xyz, ann_diam) -> np.ndarray:
    """Class-1 candidates that lie within no annotation's radius (the annotation already counts)."""
    keep = np.zeros(len(cand_uids), bool)
    ann_rows = _by_series(ann_uids)
    for i in np.flatnonzero(cand_class == 1):
        rows = ann_rows.get(cand_uids[i])
        if rows is None:
            keep[i] = True
            continue
        dist = np.linalg.norm(ann_xyz[rows] - cand_xyz[i], axis=1)
        keep[i] = not np.any(dist <= ann_diam[rows] / 2)
    return keep
