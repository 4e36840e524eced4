"""Family attribution of one candidate against few references, on the authors' real published fingerprints.

    python bench/attribution.py [--data DIR ...] [--labels FILE] [--population FILE]
    python bench/attribution.py --write-population tg_verify/analysis/data/population.json

DIR holds the release's flat fingerprint files (`features/*.json` or `*.json`) and `labels.yaml`
(`model_name -> {family, base}`); the default is the development set in ../shared/data. Prints:

1. leave-one-out accuracy of each way to attribute one derivative, with only the bases as
   references (and, for the last rows, the other derivatives too), beside the paper's joint
   clustering of everything at once. "Leave-one-out": every scale that is measured on data (the
   population spreads, the lineage spreads) is re-measured without the candidate;
2. the per-candidate result of tg-verify's attribution (population scale, bases only);
3. how a scale fitted on k references inflates genuine derivatives' distances (why fewer than 8
   references do not carry the threshold of 7);
4. each derivative classified with the population file tg-verify ships (`--population`, default the
   shipped one), split into files it was measured on and any other: on the held-back half (e.g.
   `--data DEV --data HELD_BACK`) the second line is the out-of-sample check.

`--write-population` measures the population scale on DIR and writes it with its provenance (how
the shipped file was made). Every figure in docs/results.md ("Attribution on real fingerprints")
comes from this script.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sklearn.cluster import KMeans  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from tg_verify import __version__  # noqa: E402
from tg_verify.analysis.attribution import ClassifierSettings, classify  # noqa: E402
from tg_verify.analysis.population import (  # noqa: E402
    MAD_TO_SD,
    POPULATION_FEATURES,
    PopulationModel,
    PopulationScale,
    fit_population,
    infer_parents,
    load_population,
    to_document,
)
from tg_verify.analysis.references import Label, Reference, fingerprint_paths, read_labels  # noqa: E402
from tg_verify.atomic import canonical_json, write_bytes  # noqa: E402
from tg_verify.fingerprint.document import FEATURE_VERSION, LEGACY_FEATURE_VERSION, Fingerprint, load  # noqa: E402

DEFAULT_DATA = ROOT.parent.parent / "shared" / "data" / "tensorguard-release"
SOURCE = ("TensorGuard authors' published fingerprints (security-pride/TensorGuard, features/, commit dd18d1e, "
          "Apache-2.0): the development half")
TG2_NOTE = ("used for native fingerprints too: tg-verify's features share the release's definitions on these 14 "
            "features (gradient statistics of the same tensors' kinds, inputs of the same distributions); its "
            "global_* average every tensor instead of a 10-tensor sample and its repeats are independent draws, "
            "both of which can only shrink the spread across models, so distances on this scale are if anything "
            "smaller for native fingerprints. No native fingerprint of a real model could be made offline to "
            "measure it directly; num_layers (model depth in tg-verify, 10 in every release file) has no "
            "population spread and is left out.")


@dataclass(frozen=True)
class Model:
    """One labelled fingerprint of the data set."""

    id: str
    family: str
    base: bool
    fingerprint: Fingerprint
    path: Path

    @property
    def vector(self) -> np.ndarray:
        return np.array([self.fingerprint.features[n] for n in POPULATION_FEATURES], dtype=np.float64)


def load_models(data: Path, labels_path: Path | None) -> tuple[list[Model], Path]:
    """The labelled fingerprints of DATA (its features/ folder, else it and its sub-folders), in file-name order."""
    if (data / "features").is_dir():
        folders = [data / "features"]
    else:
        folders = [d for d in (data, *sorted(p for p in data.iterdir() if p.is_dir())) if any(d.glob("*.json"))]
    found = [p for p in (data / "labels.yaml", data / "labels.yml") if p.exists()]
    if labels_path is None and not found:
        raise SystemExit(f"{data}: no labels.yaml (pass --labels)")
    labels_file = labels_path or found[0]
    labels: dict[str, Label] = read_labels(labels_file)
    models = []
    for path in fingerprint_paths(folders):
        fp = load(path)
        key = fp.model_name if fp.model_name in labels else path.stem
        if key not in labels:
            raise SystemExit(f"{path}: model {fp.model_name!r} has no entry in {labels_file}")
        label = labels[key]
        models.append(Model(id=fp.model_name, family=label.family, base=label.base, fingerprint=fp, path=path))
    return models, labels_file


def population_models(models: Sequence[Model]) -> list[PopulationModel]:
    return [PopulationModel(id=m.id, family=m.family, base=m.base, vector=tuple(m.vector)) for m in models]


def fit(models: Sequence[Model], provenance: dict | None = None) -> PopulationScale:
    return fit_population(population_models(models), name="tensorguard-release-dev",
                          applies_to=(LEGACY_FEATURE_VERSION, FEATURE_VERSION), provenance=provenance or {},
                          notes={FEATURE_VERSION: TG2_NOTE})


def references_of(models: Sequence[Model], with_derivatives: bool) -> list[Reference]:
    return [Reference(id=m.id, family=m.family, fingerprint=m.fingerprint, base=m.base) for m in models
            if m.base or with_derivatives]


# ------------------------------------------------------------------------------------- methods


Method = Callable[[list[Model], Model], str]  # (all models but the candidate, candidate) -> family


def ours(with_derivatives: bool) -> Method:
    """tg-verify's classify on the population scale, the population re-measured without the candidate."""
    def run(rest: list[Model], candidate: Model) -> str:
        population = fit(rest)
        result = classify(candidate.fingerprint, references_of(rest, with_derivatives),
                          ClassifierSettings(scale="population"), population=population)
        return result.family
    return run


def reference_fitted(rest: list[Model], candidate: Model) -> str:
    """The release's classify with the bases as its reference set: z-scores fitted on the bases."""
    result = classify(candidate.fingerprint, references_of(rest, False), ClassifierSettings(scale="references"))
    return result.family


def population_zscores(rest: list[Model], candidate: Model) -> str:
    """Nearest base in population z-scores (no lineage weighting), population without the candidate."""
    spread = np.array([m.vector for m in rest]).std(axis=0)
    bases = [m for m in rest if m.base]
    return min(bases, key=lambda b: float(np.linalg.norm((b.vector - candidate.vector) / spread))).family


def lineage_estimator(estimate: Callable[[np.ndarray], np.ndarray]) -> Method:
    """Nearest base on a lineage scale measured with another estimator (robustness check, not a choice)."""
    def run(rest: list[Model], candidate: Model) -> str:
        matrix = np.array([m.vector for m in rest])
        spread = matrix.std(axis=0)
        parents = infer_parents(population_models(rest), spread)
        by_id = {m.id: m.vector for m in rest}
        scale = estimate(np.array([by_id[d] - by_id[b] for d, b in parents.items()]))
        bases = [m for m in rest if m.base]
        return min(bases, key=lambda b: float(np.linalg.norm((b.vector - candidate.vector) / scale))).family
    return run


def joint_loo(rest: list[Model], candidate: Model) -> str:
    """The paper's joint clustering of every other model (z-scores and K-Means), candidate to the nearest centroid."""
    matrix = np.array([m.vector for m in rest])
    scaler = StandardScaler().fit(matrix)
    points = scaler.transform(matrix)
    bases = [i for i, m in enumerate(rest) if m.base]
    km = KMeans(n_clusters=len(bases), init=points[bases], n_init=1, random_state=0).fit(points)
    target = scaler.transform(candidate.vector[None, :])
    return rest[bases[int(np.argmin(np.linalg.norm(km.cluster_centers_ - target, axis=1)))]].family


def joint_in_sample(models: Sequence[Model]) -> tuple[int, list[str]]:
    """Table I's centroid-initialised K-Means: all models clustered at once, derivatives scored in place."""
    matrix = np.array([m.vector for m in models])
    points = StandardScaler().fit_transform(matrix)
    bases = [i for i, m in enumerate(models) if m.base]
    km = KMeans(n_clusters=len(bases), init=points[bases], n_init=1, random_state=0).fit(points)
    wrong = [m.id for i, m in enumerate(models) if not m.base and models[bases[km.labels_[i]]].family != m.family]
    return sum(1 for m in models if not m.base) - len(wrong), wrong


def leave_one_out(models: list[Model], method: Method) -> tuple[int, list[str]]:
    wrong = []
    for i, candidate in enumerate(models):
        if candidate.base:
            continue
        rest = models[:i] + models[i + 1:]
        if method(rest, candidate) != candidate.family:
            wrong.append(candidate.id)
    return sum(1 for m in models if not m.base) - len(wrong), wrong


# -------------------------------------------------------------------------------------- tables


def _percent(correct: int, total: int) -> str:
    return f"{correct / total:.1%} ({correct}/{total})"


def accuracy_table(models: list[Model]) -> None:
    total = sum(1 for m in models if not m.base)
    rows: list[tuple[str, str, tuple[int, list[str]]]] = [
        ("scale fitted on the 8 bases (tg-verify before; the release's classify)", "bases",
         leave_one_out(models, reference_fitted)),
        ("population z-scores, nearest base", "bases", leave_one_out(models, population_zscores)),
        ("population scale + lineage spread (tg-verify classify)", "bases", leave_one_out(models, ours(False))),
        ("  same, lineage spread by RMS instead of median (check)", "bases",
         leave_one_out(models, lineage_estimator(lambda d: np.sqrt((d ** 2).mean(axis=0))))),
        ("  same, lineage spread by mean |d| (check)", "bases",
         leave_one_out(models, lineage_estimator(lambda d: np.abs(d).mean(axis=0)))),
        ("population scale + lineage spread, derivatives move centres", "bases + other derivatives",
         leave_one_out(models, ours(True))),
        ("paper: joint clustering of all other models (z-scores, K-Means)", "bases + other derivatives",
         leave_one_out(models, joint_loo)),
        ("paper: joint clustering of everything, in sample (Table I)", "all models, candidate included",
         joint_in_sample(models)),
    ]
    print(f"Per-candidate attribution on {len(models)} real fingerprints ({total} derivatives scored), "
          "leave-one-out\n")
    print("| method | references | accuracy | misattributed |\n|---|---|---|---|")
    for name, refs, (correct, wrong) in rows:
        print(f"| {name} | {refs} | {_percent(correct, total)} | {', '.join(wrong) or '—'} |")
    print()


def per_candidate(models: list[Model]) -> None:
    print("tg-verify classify, leave-one-out, the 8 bases as references (lineage scale ranks, population scale "
          "measures)\n")
    print("| derivative | family | attributed (base) | lineage distance | family margin | population distance | "
          "cluster |\n|---|---|---|---|---|---|---|")
    for i, candidate in enumerate(models):
        if candidate.base:
            continue
        rest = models[:i] + models[i + 1:]
        result = classify(candidate.fingerprint, references_of(rest, False), ClassifierSettings(scale="population"),
                          population=fit(rest))
        mark = "" if result.family == candidate.family else " **wrong**"
        margin = "—" if result.family_margin is None else f"{result.family_margin:.2f}"
        cluster = "out (> 7)" if result.out_of_cluster else "in"
        print(f"| {candidate.id} | {candidate.family} | {result.family} ({result.base}){mark} | "
              f"{result.lineage_distance:.2f} | {margin} | {result.distance:.2f} | {cluster} |")
    print()


def reference_count_table(models: list[Model]) -> None:
    """Derivatives' distance to their own base on a scale fitted on k of the bases, against the population scale."""
    bases = [m for m in models if m.base]
    spread = np.array([m.vector for m in models]).std(axis=0)
    parents = infer_parents(population_models(models), spread)
    by_id = {m.id: m for m in models}
    print("Scale fitted on k references: a derivative's distance to its own base (every subset of k of the bases "
          "that holds it)\n")
    print("| k | pairs | median distance | 90th percentile | share > 7 | median / population-scale median | "
          "nearest base right |\n|---|---|---|---|---|---|---|")
    population_median = float(np.median([np.linalg.norm((by_id[d].vector - by_id[b].vector) / spread)
                                         for d, b in parents.items()]))
    for k in range(2, len(bases) + 1):
        distances, right = [], []
        for subset in combinations(range(len(bases)), k):
            chosen = [bases[j] for j in subset]
            matrix = np.array([b.vector for b in chosen])
            mean, sd = matrix.mean(axis=0), matrix.std(axis=0)
            sd[sd == 0] = 1.0
            for d, b in parents.items():
                if b not in {c.id for c in chosen}:
                    continue
                z = (by_id[d].vector - mean) / sd
                distances.append(float(np.linalg.norm(z - (by_id[b].vector - mean) / sd)))
                nearest = min(chosen, key=lambda c: float(np.linalg.norm((c.vector - mean) / sd - z)))
                right.append(nearest.family == by_id[d].family)
        values = np.array(distances)
        print(f"| {k} | {len(values)} | {np.median(values):.2f} | {np.quantile(values, 0.9):.2f} | "
              f"{np.mean(values > 7):.1%} | {np.median(values) / population_median:.1f}x | {np.mean(right):.1%} |")
    print(f"\npopulation scale (all {len(models)} models): median {population_median:.2f}\n")


def shipped_check(models: list[Model], population: PopulationScale) -> None:
    """Every derivative against the bases with the population file as shipped, split by whether the file was
    one the population was measured on (in sample) or not (out of sample: the held-back check)."""
    measured = {f.get("sha256") for f in population.provenance.get("files", []) if isinstance(f, dict)}
    refs = references_of(models, False)
    print(f"With the population file as shipped ({population.name}, measured on {population.models} models), "
          "the bases as references:")
    for title, inside in (("in sample (files the population was measured on)", True),
                          ("out of sample (any other file)", False)):
        chosen = [m for m in models if not m.base and
                  (hashlib.sha256(m.path.read_bytes()).hexdigest() in measured) == inside]
        wrong = []
        for candidate in chosen:
            result = classify(candidate.fingerprint, refs, ClassifierSettings(scale="population"),
                              population=population)
            if result.family != candidate.family:
                wrong.append(f"{candidate.id} -> {result.family}")
        if chosen:
            print(f"  {title}: {_percent(len(chosen) - len(wrong), len(chosen))} right; misattributed: "
                  f"{', '.join(wrong) or 'none'}")
        else:
            print(f"  {title}: no such derivative here")
    print()


def write_population(models: list[Model], labels_file: Path, out: Path, data: Path) -> None:
    provenance = {
        "source": SOURCE,
        "files": [{"name": m.path.name, "sha256": hashlib.sha256(m.path.read_bytes()).hexdigest()} for m in models],
        "labels": {"name": labels_file.name, "sha256": hashlib.sha256(labels_file.read_bytes()).hexdigest()},
        "generated_by": "python bench/attribution.py --write-population " + str(out),
        "tool": f"tg-verify {__version__}",
        "estimators": {
            "spread": "standard deviation over every model (ddof 0), as StandardScaler over the release's model set",
            "lineage_spread": f"{MAD_TO_SD} x median |derivative - base| over derivatives; a derivative's base is the "
                              "nearest base of its labelled family in population z-units (the labels give no parent)",
            "span": "every feature within [low - (high - low), high + (high - low)]",
        },
    }
    scale = fit(models, provenance)
    write_bytes(out, canonical_json(to_document(scale)))
    print(f"wrote {out}: {scale.models} models, {scale.derivatives} derivative-base pairs (from {data})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, action="append", default=None, metavar="DIR",
                        help=f"release data folder, repeatable (default {DEFAULT_DATA})")
    parser.add_argument("--labels", type=Path, default=None, help="labels file (default DIR/labels.yaml of each DIR)")
    parser.add_argument("--population", type=Path, default=None, help="population file to check (default: shipped)")
    parser.add_argument("--write-population", type=Path, default=None, metavar="FILE",
                        help="measure the population scale on DATA and write it (then stop)")
    args = parser.parse_args(argv)
    folders = args.data or [DEFAULT_DATA]
    models, labels_file = [], None
    for folder in folders:
        found, labels_file = load_models(folder, args.labels)
        known = {m.id for m in models}
        models.extend(m for m in found if m.id not in known)  # a base copied into each folder counts once
    if not any(m.base for m in models):
        raise SystemExit("no base models among the labelled fingerprints: pass the folder that holds them too")
    if args.write_population is not None:
        if len(folders) != 1 or labels_file is None:
            raise SystemExit("--write-population measures one data folder")
        write_population(models, labels_file, args.write_population, folders[0])
        return 0
    print(f"data: {', '.join(map(str, folders))} ({len(models)} fingerprints, {sum(m.base for m in models)} bases); "
          f"tg-verify {__version__}\n")
    accuracy_table(models)
    per_candidate(models)
    reference_count_table(models)
    shipped_check(models, load_population(args.population))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
