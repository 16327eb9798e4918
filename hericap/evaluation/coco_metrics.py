"""Caption metrics through the coco-caption toolkit (``pycocoevalcap``).

PTB tokenisation (Java), BLEU-1..4, METEOR 1.5 (Java), ROUGE-L and CIDEr-D exactly as the toolkit
computes them. SPICE needs the Stanford CoreNLP 3.6.0 jars, which the toolkit downloads on first
use (impossible offline): HeriCap looks for them (``HERICAP_SPICE_JARS`` or the toolkit's own
``spice/lib``), reports SPICE as unavailable with the reason when they are missing, and otherwise
runs SPICE under Java 17 with the module flags it needs and its temp/cache folders outside
site-packages.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "METRIC_KEYS",
    "CocoScorer",
    "Scores",
    "SpiceError",
    "SpiceStatus",
    "find_spice",
]

logger = logging.getLogger(__name__)

METRIC_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
# The end of SPICE's Java output kept with its error (enough for the exception and trace).
SPICE_ERROR_TAIL_CHARS = 4000
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
SPICE_ENV = "HERICAP_SPICE_JARS"
# Java >= 9 closes these packages; SPICE's LMDB cache and CoreNLP reach into them.
_JAVA_OPENS = [
    "--add-opens",
    "java.base/java.lang=ALL-UNNAMED",
    "--add-opens",
    "java.base/java.nio=ALL-UNNAMED",
    "--add-opens",
    "java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens",
    "java.base/java.util=ALL-UNNAMED",
]


@dataclass
class SpiceStatus:
    available: bool
    reason: str
    classpath: list[str]


def _toolkit_dir() -> Path:
    # pycocoevalcap is a namespace package (no __file__); locate it through a module.
    import pycocoevalcap.bleu.bleu as bleu_module

    return Path(bleu_module.__file__).parent.parent


def find_spice(jar_dir: str | None = None) -> SpiceStatus:
    """Whether SPICE can run: Java on PATH and both CoreNLP 3.6.0 jars found.

    Args:
        jar_dir: folder holding the CoreNLP jars; defaults to ``$HERICAP_SPICE_JARS``, then the
            toolkit's ``spice/lib``.
    """
    spice_dir = _toolkit_dir() / "spice"
    candidates = [Path(d) for d in (jar_dir, os.environ.get(SPICE_ENV)) if d]
    candidates.append(spice_dir / "lib")
    if shutil.which("java") is None:
        return SpiceStatus(False, "java is not on PATH", [])
    for d in candidates:
        if all((d / j).is_file() for j in CORENLP_JARS):
            classpath = [
                str(spice_dir / "spice-1.0.jar"),
                str(spice_dir / "lib" / "*"),
                *(str(d / j) for j in CORENLP_JARS),
            ]
            return SpiceStatus(True, f"CoreNLP jars in {d}", classpath)
    return SpiceStatus(
        False,
        f"Stanford CoreNLP 3.6.0 jars ({', '.join(CORENLP_JARS)}) not found in "
        f"{', '.join(str(c) for c in candidates)}; set {SPICE_ENV} to their folder",
        [],
    )


class SpiceError(RuntimeError):
    """SPICE was found but its Java process failed; ``stderr`` holds the end of its output."""

    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(message)
        self.stderr = stderr


def _java_error(stderr: str) -> str:
    """The line of a Java stack trace that names the error (its first ``...Error``/``...Exception``
    line), else the last line of ``stderr``."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if "Error" in line or "Exception" in line:
            return line.removeprefix('Exception in thread "main" ')
    return lines[-1] if lines else "no output"


def _run_spice(
    status: SpiceStatus, gts: Mapping[str, list[str]], res: Mapping[str, list[str]]
) -> dict[str, float]:
    """Run SPICE with temp and cache folders in the system temp dir (not site-packages);
    returns each image's SPICE F-score (NaN where SPICE gives none, as the toolkit counts it)."""
    work = Path(tempfile.mkdtemp(prefix="hericap-spice-"))
    cache = Path(tempfile.gettempdir()) / "hericap-spice-cache"
    cache.mkdir(exist_ok=True)
    try:
        data = [{"image_id": k, "test": res[k][0], "refs": list(gts[k])} for k in res]
        (work / "in.json").write_text(json.dumps(data))
        cmd = [
            "java",
            *_JAVA_OPENS,
            "-Xmx8G",
            "-cp",
            os.pathsep.join(status.classpath),
            "edu.anu.spice.SpiceScorer",
            str(work / "in.json"),
            "-cache",
            str(cache),
            "-out",
            str(work / "out.json"),
            "-subset",
            "-silent",
        ]
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            reason = f"SPICE failed (exit {proc.returncode}): {_java_error(proc.stderr)}"
            raise SpiceError(reason, proc.stderr[-SPICE_ERROR_TAIL_CHARS:])
        results = json.loads((work / "out.json").read_text())
        # As the toolkit: undefined per-image F-scores count as NaN in the mean.
        return {
            str(r["image_id"]): np.nan
            if r["scores"]["All"]["f"] is None
            else r["scores"]["All"]["f"]
            for r in results
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Scores:
    """The toolkit's scores of one caption per image: ``corpus`` (every key of
    :data:`METRIC_KEYS`), ``per_image`` (``{image_id: {metric: value}}``, the values the toolkit
    computes per image; its corpus BLEU and METEOR are not their means) and, when groups were
    given, ``groups`` (``{group: corpus scores of its images alone}``)."""

    corpus: dict[str, float | None]
    per_image: dict[str, dict[str, float | None]]
    groups: dict[str, dict[str, float | None]] = field(default_factory=dict)


def _check_ids(references: Mapping[str, object], candidates: Mapping[str, object]) -> None:
    if set(references) != set(candidates):
        missing = sorted(set(references) - set(candidates))[:5]
        extra = sorted(set(candidates) - set(references))[:5]
        raise ValueError(f"ids differ: without candidate {missing}, without references {extra}")
    if not candidates:
        raise ValueError("nothing to score")


class CocoScorer:
    """Score captions with the coco-caption toolkit; reuses one METEOR JVM across calls.

    Args:
        meteor: compute METEOR (starts a 2 GB JVM).
        spice_jars: folder of the CoreNLP jars for SPICE (see :func:`find_spice`).
    """

    def __init__(self, meteor: bool = True, spice_jars: str | None = None) -> None:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        self._tokenizer = PTBTokenizer()
        self._bleu, self._rouge, self._cider = Bleu(4), Rouge(), Cider()
        self._meteor = None
        if meteor:
            from pycocoevalcap.meteor.meteor import Meteor

            self._meteor = Meteor()
        self.spice = find_spice(spice_jars)
        if not self.spice.available:
            logger.info("SPICE unavailable: %s", self.spice.reason)

    def tokenize(self, captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        """PTB-tokenise (Java) ``{id: [caption, ...]}``."""
        return self._tokenizer.tokenize(
            {k: [{"caption": c} for c in v] for k, v in captions.items()}
        )

    def tokenize_pair(
        self, references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]
    ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """References and candidates PTB-tokenised in one Java run (each line is tokenised on
        its own, so this equals two runs and saves a JVM start). Candidates go first: an empty
        caption on the last line would get no output line from the tokeniser."""
        both = self.tokenize(
            {("c", k): [v] for k, v in candidates.items()}
            | {("r", k): list(v) for k, v in references.items()}
        )
        gts = {k: both[("r", k)] for k in references if ("r", k) in both}
        res = {k: both[("c", k)] for k in candidates}
        return gts, res

    def score(
        self, references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]
    ) -> dict[str, float | None]:
        """Corpus scores of one candidate per image against its references.

        Returns every key of :data:`METRIC_KEYS` (``SPICE`` is ``None`` when unavailable).
        """
        return self.evaluate(references, candidates).corpus

    def evaluate(
        self,
        references: Mapping[str, Sequence[str]],
        candidates: Mapping[str, str],
        groups: Mapping[str, str] | None = None,
    ) -> Scores:
        """Corpus and per-image scores; with ``groups`` (``{image_id: group}``, e.g. nocaps'
        domains) also each group's corpus scores, computed on its images alone as the nocaps
        evaluation does (captions are tokenised once; SPICE, an average of per-image scores, is
        not run again).

        Raises:
            ValueError: the ids of references and candidates differ, or there are none.
        """
        _check_ids(references, candidates)
        return self.evaluate_tokenized(*self.tokenize_pair(references, candidates), groups)

    def evaluate_tokenized(
        self,
        gts: Mapping[str, list[str]],
        res: Mapping[str, list[str]],
        groups: Mapping[str, str] | None = None,
    ) -> Scores:
        """:meth:`evaluate` of captions :meth:`tokenize_pair` has tokenised already (a report
        scores several subsets of the same captions)."""
        _check_ids(gts, res)
        gts, res = dict(gts), dict(res)
        spice = self._spice(gts, res)
        scores = self._toolkit(gts, res, spice)
        for group in sorted(set((groups or {}).values())):
            ids = [k for k in gts if groups[k] == group]
            sub = self._toolkit({k: gts[k] for k in ids}, {k: res[k] for k in ids}, spice)
            scores.groups[group] = sub.corpus
        return scores

    def _toolkit(
        self,
        gts: dict[str, list[str]],
        res: dict[str, list[str]],
        spice: dict[str, float] | None,
    ) -> Scores:
        """The toolkit's metrics of tokenised captions; SPICE from its per-image ``spice``."""
        ids = list(gts)
        per_image: dict[str, dict[str, float | None]] = {k: {} for k in ids}
        corpus: dict[str, float | None] = {}
        bleu, bleu_images = self._bleu.compute_score(gts, res, verbose=0)
        for n, (value, values) in enumerate(zip(bleu, bleu_images, strict=True), start=1):
            corpus[f"Bleu_{n}"] = float(value)
            for k, v in zip(ids, values, strict=True):
                per_image[k][f"Bleu_{n}"] = float(v)
        metrics = [("ROUGE_L", self._rouge), ("CIDEr", self._cider)]
        if self._meteor is not None:
            metrics.insert(0, ("METEOR", self._meteor))
        for key, metric in metrics:
            value, values = metric.compute_score(gts, res)
            corpus[key] = float(value)
            for k, v in zip(ids, values, strict=True):
                per_image[k][key] = float(v)
        for k in ids:
            per_image[k]["SPICE"] = None if spice is None else float(spice[k])
        corpus["SPICE"] = None if spice is None else float(np.mean([spice[k] for k in ids]))
        if self._meteor is None:
            corpus["METEOR"] = None
        return Scores(
            {key: corpus[key] for key in METRIC_KEYS},
            {k: {key: per_image[k].get(key) for key in METRIC_KEYS} for k in ids},
        )

    def _spice(self, gts: dict[str, list[str]], res: dict[str, list[str]]) -> dict | None:
        """Per-image SPICE, or ``None`` when it is unavailable. A SPICE that fails to run does
        not take the other metrics down: it is logged, marked unavailable with the Java error as
        the reason (so reports say why), and not retried."""
        if not self.spice.available:
            return None
        try:
            return _run_spice(self.spice, gts, res)
        except SpiceError as err:
            logger.error("%s; SPICE is reported as unavailable from now on\n%s", err, err.stderr)
            self.spice = SpiceStatus(False, str(err), [])
            return None

    def close(self) -> None:
        if self._meteor is not None:
            with self._meteor.lock:
                self._meteor.meteor_p.stdin.close()
                self._meteor.meteor_p.kill()
                self._meteor.meteor_p.wait()
            self._meteor = None

    def __enter__(self) -> CocoScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cider_d(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> float:
    """The toolkit's CIDEr-D without a JVM, for per-epoch validation: captions are tokenised by
    :func:`~hericap.data.ptb.ptb_tokenize` and scored by the vectorised
    :class:`~hericap.evaluation.cider.CiderD` (equal to the toolkit's ``Cider``)."""
    from hericap.data.ptb import ptb_tokenize
    from hericap.evaluation.cider import cider_d_scores

    gts = {k: [ptb_tokenize(c) for c in v] for k, v in references.items()}
    res = {k: ptb_tokenize(v) for k, v in candidates.items()}
    return cider_d_scores(gts, res)[0]
