"""The self-improving lift predictor: features -> predicted lift (+ uncertainty).

Every stage honours one small contract, River style::

    predict(features) -> Prediction      # pure: no state changes
    learn(features, realized_lift)       # one label

and :func:`lab.checks.check_stage` runs the same contract tests over each.
The stages, in the order the :class:`Predictor` router hands over between
them:

* :class:`AdvStdHeuristic` - cold start: lift ~ scale * adv_std (seed 001,
  "cold-starts as adv_std"); the scale is calibrated on the labels, the
  ranking never changes.
* :class:`RiverStage` - an online bagged Bayesian ridge that learns from every
  label; uncertainty is the spread of the bag's members. Takes over after
  ``PredictorSettings.river_after`` labels.
* :class:`LightGBMStage` - a seed ensemble of monotone-constrained boosted
  trees refit on the label history in the background and promoted only when
  it ranks the most recent (held-out) labels better than what was served.

Residual drift (ADWIN on |realized - predicted|, rises only) requests a refit.
"""

from __future__ import annotations

import itertools
import math
import pickle
import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from river import drift, ensemble, linear_model, preprocessing, stats

from daemon.config import PredictorSettings
from daemon.core.features import (
    FEATURE_NAMES,
    FEATURE_SCHEMA,
    MONOTONE,
    feature_vector,
)
from daemon.core.ranking import pairwise_accuracy, spearman
from daemon.core.vocabulary import SELECTIONS

if TYPE_CHECKING:
    import lightgbm as lgb


def _lgb() -> Any:
    # Imported on first use: a scorer that never refits never loads LightGBM.
    import lightgbm

    return lightgbm


def _mean_spread(preds: Sequence[float]) -> tuple[float, float]:
    """The members' mean and population standard deviation.

    In floats (``math.fsum``), not ``statistics.pstdev``'s exact fractions:
    those cost more than the members' predictions on every scored cohort.
    """
    mean = math.fsum(preds) / len(preds)
    return mean, math.sqrt(math.fsum((p - mean) ** 2 for p in preds) / len(preds))


@dataclass(frozen=True)
class Manifest:
    """What a predictor snapshot is: version, serving stage, labels learned."""

    version: int
    stage: str
    label_seq: int  # the last label (in the shell's label store) the snapshot has learned
    n_labels: int
    holdout_score: float | None
    feature_schema: str
    created_ts: float
    lgbm_members: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"v{self.version}.{self.label_seq:09d}"


@dataclass(frozen=True)
class Snapshot:
    """A predictor's whole state as bytes: the online stages and LightGBM model strings."""

    manifest: Manifest
    state: bytes
    lgbm_models: tuple[str, ...]


@dataclass(frozen=True)
class Prediction:
    lift: float  # predicted NLL-lift, nats
    uncertainty: float  # one standard deviation, nats; >= 0
    stage: str
    model_version: str


@runtime_checkable
class PredictorStage(Protocol):
    """The contract of every predictor stage and of the Predictor itself."""

    def predict(self, features: Mapping[str, float]) -> Prediction: ...

    def learn(self, features: Mapping[str, float], realized_lift: float) -> None: ...


def _check_label(realized_lift: float) -> float:
    if isinstance(realized_lift, bool) or not isinstance(realized_lift, int | float):
        raise ValueError(f"realized_lift: not a number ({type(realized_lift).__name__})")
    if not math.isfinite(realized_lift):
        raise ValueError(f"realized_lift: not finite ({realized_lift!r})")
    return float(realized_lift)


class AdvStdHeuristic:
    """Cold start: predicted lift = scale * adv_std.

    The scale is fitted through the origin on the labels seen (least squares),
    clamped positive so that the seeds' ranking - more disagreement, more lift
    - is kept whatever the first few noisy labels say.
    """

    stage = "heuristic"
    UNCERTAINTY = 0.5  # nats: wide on purpose, nothing has been learned yet

    def __init__(self, model_version: str = "v0") -> None:
        self.model_version = model_version
        self._sxy = 0.0
        self._sxx = 0.0

    @property
    def scale(self) -> float:
        return max(self._sxy / self._sxx, 1e-3) if self._sxx > 0 else 1.0

    def predict(self, features: Mapping[str, float]) -> Prediction:
        x = feature_vector(features)[FEATURE_NAMES.index("adv_std")]
        return Prediction(self.scale * x, self.UNCERTAINTY, self.stage, self.model_version)

    def learn(self, features: Mapping[str, float], realized_lift: float) -> None:
        y = _check_label(realized_lift)
        x = feature_vector(features)[FEATURE_NAMES.index("adv_std")]
        self._sxy += x * y
        self._sxx += x * x


class RiverStage:
    """Online bagged Bayesian ridge on standardized features and target.

    Features and target are standardized online, so one prior fits every
    feature scale (token counts, log-probs, ratios) and every lift scale.
    The bag (Poisson(1) online bootstrap) gives the uncertainty: the spread of
    its members' predictions, which shrinks as labels agree.
    """

    stage = "river"

    def __init__(self, seed: int = 0, n_models: int = 5, model_version: str = "v1") -> None:
        self.model_version = model_version
        self.n_labels = 0
        self._scaler = preprocessing.StandardScaler()
        self._y_mean = stats.Mean()
        self._y_var = stats.Var()
        self._bag = ensemble.BaggingRegressor(
            model=linear_model.BayesianLinearRegression(alpha=1.0, beta=1.0),
            n_models=n_models,
            seed=seed,
        )

    def _x(self, features: Mapping[str, float]) -> dict[str, float]:
        return self._scaler.transform_one(
            dict(zip(FEATURE_NAMES, feature_vector(features), strict=True))
        )

    def _y_scale(self) -> tuple[float, float]:
        sd = math.sqrt(self._y_var.get()) if self.n_labels > 1 else 0.0
        return self._y_mean.get(), (sd if sd > 1e-12 else 1.0)

    @property
    def lift_spread(self) -> float:
        """Standard deviation of the realized lifts learned so far (1 before two labels)."""
        return self._y_scale()[1]

    def member_predictions(self, features: Mapping[str, float]) -> list[float]:
        xs = self._x(features)
        mu, sd = self._y_scale()
        return [mu + sd * m.predict_one(xs) for m in self._bag]

    def predict(self, features: Mapping[str, float]) -> Prediction:
        preds = self.member_predictions(features)
        return Prediction(*_mean_spread(preds), self.stage, self.model_version)

    def learn(self, features: Mapping[str, float], realized_lift: float) -> None:
        y = _check_label(realized_lift)
        x = dict(zip(FEATURE_NAMES, feature_vector(features), strict=True))
        self._scaler.learn_one(x)
        self._y_mean.update(y)
        self._y_var.update(y)
        self.n_labels += 1
        mu, sd = self._y_scale()
        self._bag.learn_one(self._scaler.transform_one(x), (y - mu) / sd)


MONOTONE_CONSTRAINTS = [MONOTONE.get(name, 0) for name in FEATURE_NAMES]


_DATASET_PARAMS: dict[str, Any] = {"max_bin": 63, "min_data_in_bin": 1, "verbose": -1}


def lgbm_params(n_rows: int, seed: int) -> dict[str, Any]:
    return {
        **_DATASET_PARAMS,
        "objective": "regression",
        "learning_rate": 0.05,
        "num_leaves": 15,
        # Few labels early on: leaves must still be able to split.
        "min_data_in_leaf": max(3, min(20, n_rows // 50)),
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "monotone_constraints": MONOTONE_CONSTRAINTS,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 1,  # a background refit must not starve the scoring loop
        "verbose": -1,
    }


class LightGBMStage:
    """A seed ensemble of monotone boosted trees, fitted in batch.

    Uncertainty is the members' spread: LightGBM refuses monotone constraints
    with the quantile objective, and the constraints are the seeds' prior.
    ``learn`` is a no-op: this stage is refit on the label history by the
    Predictor, never updated label by label.
    """

    stage = "lightgbm"
    N_ROUNDS = 100

    def __init__(self, boosters: Sequence[lgb.Booster], model_version: str = "v2") -> None:
        if not boosters:
            raise ValueError("boosters: at least one fitted model is needed")
        self._boosters = list(boosters)
        self.model_version = model_version

    @classmethod
    def fit(
        cls,
        X: np.ndarray,
        y: np.ndarray,
        *,
        seed: int = 0,
        n_members: int = 3,
        model_version: str = "v2",
    ) -> LightGBMStage:
        if len(X) != len(y) or len(y) < 4:
            raise ValueError(f"labels: need at least 4 rows with matching targets, got {len(y)}")
        # One binned Dataset serves every member: only the seeds differ.
        lgb = _lgb()
        ds = lgb.Dataset(
            X, y, feature_name=list(FEATURE_NAMES), params=_DATASET_PARAMS, free_raw_data=False
        )
        boosters = [
            lgb.train(lgbm_params(len(y), seed * 1000 + i), ds, num_boost_round=cls.N_ROUNDS)
            for i in range(n_members)
        ]
        return cls(boosters, model_version)

    @classmethod
    def from_strings(cls, models: Sequence[str], model_version: str) -> LightGBMStage:
        return cls([_lgb().Booster(model_str=s) for s in models], model_version)

    def to_strings(self) -> list[str]:
        return [b.model_to_string() for b in self._boosters]

    def predict_matrix(self, X: np.ndarray) -> np.ndarray:
        """Mean prediction per row (the refit's held-out evaluation)."""
        return np.mean([b.predict(X, num_threads=1) for b in self._boosters], axis=0)

    def predict(self, features: Mapping[str, float]) -> Prediction:
        row = np.asarray([feature_vector(features)])
        preds = [float(b.predict(row, num_threads=1)[0]) for b in self._boosters]
        return Prediction(*_mean_spread(preds), self.stage, self.model_version)

    def learn(self, features: Mapping[str, float], realized_lift: float) -> None:
        feature_vector(features)
        _check_label(realized_lift)

    def __getstate__(self) -> dict[str, Any]:
        return {"models": self.to_strings(), "model_version": self.model_version}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._boosters = [_lgb().Booster(model_str=s) for s in state["models"]]
        self.model_version = state["model_version"]


class _Standardizer:
    """Column means and spreads of a training matrix (constant columns get spread 1)."""

    def __init__(self, X: np.ndarray) -> None:
        self.mean = X.mean(axis=0)
        sd = X.std(axis=0)
        self.sd = np.where(sd > 1e-12, sd, 1.0)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean) / self.sd


def _check_rows(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(X) != len(y) or len(y) < 4:
        raise ValueError(f"labels: need at least 4 rows with matching targets, got {len(y)}")
    return X, y


class RidgeStage:
    """Ridge regression on standardized features, its penalty chosen by leave-one-out.

    Ridge's leave-one-out residuals have a closed form (through the hat
    matrix), so the penalty is picked from :data:`ALPHAS` at the cost of one
    SVD. Uncertainty: the leave-one-out residual spread. ``learn`` is a no-op:
    the stage is refit on the label history, like LightGBM.
    """

    stage = "ridge"
    ALPHAS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)

    def __init__(
        self,
        scaler: _Standardizer,
        coef: np.ndarray,
        intercept: float,
        residual_sd: float,
        alpha: float,
        model_version: str = "v2",
    ) -> None:
        self._scaler = scaler
        self._coef = coef
        self._intercept = intercept
        self.residual_sd = residual_sd
        self.alpha = alpha
        self.model_version = model_version

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, *, model_version: str = "v2") -> RidgeStage:
        X, y = _check_rows(X, y)
        scaler = _Standardizer(X)
        Z = scaler(X)
        y_mean = float(y.mean())
        yc = y - y_mean
        U, sv, Vt = np.linalg.svd(Z, full_matrices=False)
        uty = U.T @ yc
        best: tuple[float, float, np.ndarray] | None = None
        for alpha in cls.ALPHAS:
            shrink = sv**2 / (sv**2 + alpha)
            fitted = U @ (shrink * uty)
            # The hat matrix's diagonal; the fitted intercept adds 1/n to each.
            hat = (U**2) @ shrink + 1.0 / len(y)
            loo = (yc - fitted) / np.maximum(1.0 - hat, 1e-9)
            err = float(np.mean(loo**2))
            if best is None or err < best[0]:
                best = (err, alpha, Vt.T @ (sv / (sv**2 + alpha) * uty))
        assert best is not None
        err, alpha, coef = best
        return cls(scaler, coef, y_mean, math.sqrt(err), alpha, model_version)

    def predict_matrix(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(
            self._scaler(np.asarray(X, dtype=np.float64)) @ self._coef + self._intercept
        )

    def predict(self, features: Mapping[str, float]) -> Prediction:
        lift = float(self.predict_matrix(np.asarray([feature_vector(features)]))[0])
        return Prediction(lift, self.residual_sd, self.stage, self.model_version)

    def learn(self, features: Mapping[str, float], realized_lift: float) -> None:
        feature_vector(features)
        _check_label(realized_lift)


class KNNStage:
    """The k nearest labelled cohorts in standardized feature space; lift = their mean.

    Uncertainty: the spread of the neighbours' lifts. ``learn`` is a no-op:
    the stage is refit on the label history.
    """

    stage = "knn"
    K = 3

    # Above this many stored labels, neighbours are shortlisted with one
    # matrix product (|z|^2 - 2 z.Z + |Z|^2: ~0.5 ms at 100k labels, where the
    # broadcast difference takes 15 ms and a 100k x d temporary per query),
    # then the shortlist is ranked on exact distances: the same neighbours
    # unless more than SHORTLIST_SLACK labels tie at the k-th distance.
    EXACT_UP_TO = 512
    SHORTLIST_SLACK = 32

    def __init__(
        self, scaler: _Standardizer, Z: np.ndarray, y: np.ndarray, k: int, model_version: str
    ) -> None:
        self._scaler = scaler
        self._Z = Z
        self._y = y
        self.k = k
        self.model_version = model_version
        self._sq = np.einsum("ij,ij->i", Z, Z)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "_sq" not in state:  # pickled before the shortlist existed
            self._sq = np.einsum("ij,ij->i", self._Z, self._Z)

    @classmethod
    def fit(
        cls, X: np.ndarray, y: np.ndarray, *, k: int = K, model_version: str = "v2"
    ) -> KNNStage:
        X, y = _check_rows(X, y)
        scaler = _Standardizer(X)
        return cls(scaler, scaler(X), y.copy(), min(k, len(y)), model_version)

    def _neighbours(self, X: np.ndarray) -> np.ndarray:
        Z = self._scaler(np.asarray(X, dtype=np.float64))
        n = len(self._Z)
        if n <= self.EXACT_UP_TO:
            d = ((Z[:, None, :] - self._Z[None, :, :]) ** 2).sum(axis=2)
            # A stable sort: ties go to the earlier label, so a refit is deterministic.
            return np.argsort(d, axis=1, kind="stable")[:, : self.k]
        m = min(n, self.k + self.SHORTLIST_SLACK)
        approx = self._sq[None, :] - 2.0 * (Z @ self._Z.T)
        # In label order, so the stable sort below still gives ties to the earlier label.
        cand = np.sort(np.argpartition(approx, m - 1, axis=1)[:, :m], axis=1)
        exact = ((Z[:, None, :] - self._Z[cand]) ** 2).sum(axis=2)
        order = np.argsort(exact, axis=1, kind="stable")[:, : self.k]
        return np.asarray(np.take_along_axis(cand, order, axis=1))

    def predict_matrix(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self._y[self._neighbours(X)].mean(axis=1))

    def predict(self, features: Mapping[str, float]) -> Prediction:
        ys = self._y[self._neighbours(np.asarray([feature_vector(features)]))[0]]
        return Prediction(float(ys.mean()), float(ys.std()), self.stage, self.model_version)

    def learn(self, features: Mapping[str, float], realized_lift: float) -> None:
        feature_vector(features)
        _check_label(realized_lift)


class EnsembleStage:
    """The mean of a ridge, a kNN and a LightGBM fitted on the same rows.

    With tens of labels each kind's ranking of unseen cohorts is noisy, and
    their errors differ (a linear trend, local neighbours, monotone trees),
    so their mean varies less than any one of them; on the evaluation's
    battery it ranked held-out cells and subjects better than each kind
    alone (docs/RESULTS.md). The refit serves it only when it wins the same
    out-of-fold choice as the others. Uncertainty: the members' spread.
    ``learn`` is a no-op: the stage is refit.
    """

    stage = "ensemble"
    MEMBERS: tuple[str, ...] = ("ridge", "knn", "lightgbm")

    def __init__(
        self, members: Sequence[RidgeStage | KNNStage | LightGBMStage], model_version: str
    ) -> None:
        if not members:
            raise ValueError("members: at least one fitted model is needed")
        self.members = list(members)
        self.model_version = model_version

    @classmethod
    def fit(
        cls, X: np.ndarray, y: np.ndarray, *, seed: int = 0, model_version: str = "v2"
    ) -> EnsembleStage:
        return cls([_fit_single(k, X, y, seed, model_version) for k in cls.MEMBERS], model_version)

    def predict_matrix(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(np.mean([m.predict_matrix(X) for m in self.members], axis=0))

    def predict(self, features: Mapping[str, float]) -> Prediction:
        row = np.asarray([feature_vector(features)])
        preds = [float(m.predict_matrix(row)[0]) for m in self.members]
        return Prediction(*_mean_spread(preds), self.stage, self.model_version)

    def learn(self, features: Mapping[str, float], realized_lift: float) -> None:
        feature_vector(features)
        _check_label(realized_lift)


BatchStage = RidgeStage | KNNStage | LightGBMStage | EnsembleStage
# The model kinds a refit chooses between; the chosen one is promoted only when
# it ranks the newest (held-out) labels better than what was served for them.
BATCH_KINDS: tuple[str, ...] = ("ridge", "knn", "lightgbm", "ensemble")


# GRPO's advantage is group-normalised: a prompt group whose K rewards are all
# equal has zero advantage and gives the policy no gradient. A cohort with no
# group of mixed rewards (``frac_nondegenerate`` = 0: all solved or all failed)
# therefore cannot move the policy, and its lift is zero by construction (the
# battery's no-foothold cohorts measure exactly 0.0000 on every seed). The
# predictor says so without asking a model, and its batch models are fitted on
# the cohorts that carry a signal: a regression over both kinds extrapolates
# the zeros into confident mid-range guesses for unseen cells.
_SIGNAL = FEATURE_NAMES.index("frac_nondegenerate")


def has_learning_signal(features: Mapping[str, float]) -> bool:
    """False when no prompt group of the cohort has mixed rewards (GRPO's gradient is zero)."""
    return float(features.get("frac_nondegenerate", 1.0)) > 0.0


def signal_rows(X: np.ndarray) -> np.ndarray:
    """The rows of a feature matrix that carry a learning signal (see has_learning_signal)."""
    return np.asarray(X)[:, _SIGNAL] > 0.0


def predict_rows(stage: BatchStage, X: np.ndarray) -> np.ndarray:
    """A batch stage's predictions, zero for the rows without a learning signal."""
    return np.where(signal_rows(X), stage.predict_matrix(X), 0.0)


def fit_batch(
    kind: str, X: np.ndarray, y: np.ndarray, *, seed: int = 0, model_version: str = "v2"
) -> BatchStage:
    """One batch model kind fitted on a label history's rows with a learning signal.

    With fewer than 4 such rows every row is used (a model is still needed).
    """
    if kind not in BATCH_KINDS:
        raise ValueError(f"kind: unknown batch model {kind!r} (known: {', '.join(BATCH_KINDS)})")
    keep = signal_rows(X)
    if int(keep.sum()) >= 4:
        X, y = np.asarray(X)[keep], np.asarray(y)[keep]
    if kind == "ensemble":
        return EnsembleStage.fit(X, y, seed=seed, model_version=model_version)
    return _fit_single(kind, X, y, seed, model_version)


def _fit_single(
    kind: str, X: np.ndarray, y: np.ndarray, seed: int, model_version: str
) -> RidgeStage | KNNStage | LightGBMStage:
    if kind == "ridge":
        return RidgeStage.fit(X, y, model_version=model_version)
    if kind == "knn":
        return KNNStage.fit(X, y, model_version=model_version)
    return LightGBMStage.fit(X, y, seed=seed, model_version=model_version)


# --- quality ------------------------------------------------------------------


class OnlineQuality:
    """Rolling quality of served predictions against the lifts they earned.

    Feeds ``tapd_predictor_spearman``, ``tapd_predictor_pairwise_accuracy_ratio``
    and ``tapd_selection_gain_nats`` (exploit mean minus random-exploration
    mean: the predictor's worth over choosing blindly).
    """

    def __init__(self, window: int = 200) -> None:
        if window < 3:
            raise ValueError(f"window: must be >= 3, got {window}")
        self.window = window
        self._pairs: deque[tuple[float, float]] = deque(maxlen=window)
        self._by_selection: dict[str, deque[float]] = {s: deque(maxlen=window) for s in SELECTIONS}

    def update(self, predicted: float, realized: float, selection: str = "exploit") -> None:
        if selection not in self._by_selection:
            raise ValueError(f"selection: unknown {selection!r}, expected one of {SELECTIONS}")
        self._pairs.append((float(predicted), float(realized)))
        self._by_selection[selection].append(float(realized))

    @property
    def n(self) -> int:
        return len(self._pairs)

    @property
    def spearman(self) -> float:
        return spearman([p for p, _ in self._pairs], [r for _, r in self._pairs])

    @property
    def pairwise_accuracy(self) -> float:
        if len(self._pairs) < 2:
            return math.nan
        return pairwise_accuracy([p for p, _ in self._pairs], [r for _, r in self._pairs])

    def mean_realized(self, selection: str) -> float:
        v = self._by_selection[selection]
        return statistics.fmean(v) if v else math.nan

    @property
    def selection_gain(self) -> float:
        return self.mean_realized("exploit") - self.mean_realized("explore_random")


# --- drift ----------------------------------------------------------------------


class ResidualDrift:
    """ADWIN on the size of the residuals, counting only rises of the error.

    ADWIN's bound assumes values in [0, 1] (its confidence term does not scale
    with the data), so |residual| is squashed to |r| / (|r| + scale), with
    ``scale`` the spread of the realized lift: then a jump in error is seen as
    soon as it would be for any lift unit. Errors falling (a model still
    learning, a better model promoted) is also a change, but not one that
    calls for a refit.
    """

    def __init__(self, delta: float = 0.002) -> None:
        self.delta = delta
        self._adwin = drift.ADWIN(delta=delta)

    def update(self, residual: float, scale: float) -> bool:
        r = abs(residual)
        before = self._adwin.estimation
        self._adwin.update(r / (r + scale) if scale > 0 else 0.0)
        return bool(self._adwin.drift_detected and self._adwin.estimation > before)

    def reset(self) -> None:
        self._adwin = drift.ADWIN(delta=self.delta)


# --- refit ----------------------------------------------------------------------


@dataclass(frozen=True)
class RefitResult:
    promoted: bool
    candidate_score: float
    incumbent_score: float
    n_train: int
    n_holdout: int
    n_labels: int
    stage: BatchStage | None  # refit on every label; set only when promoted
    kind: str = "lightgbm"  # the model kind chosen on the older labels
    kind_scores: dict[str, float] = field(default_factory=dict)


# Model selection looks at no more than this many of the older labels, so a
# refit's cost does not grow with the whole history.
SELECTION_WINDOW = 2000
SELECTION_FOLDS = 5


def _out_of_fold(kind: str, X: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray | None:
    """One kind's predictions of every row from folds that did not see it (time-ordered)."""
    n = len(y)
    folds = min(SELECTION_FOLDS, n // 4)
    if folds < 2:
        return None
    pred = np.empty(n)
    bounds = np.linspace(0, n, folds + 1).astype(int)
    for lo, hi in itertools.pairwise(bounds):
        train = np.r_[0:lo, hi:n]
        if len(train) < 4:
            return None
        pred[lo:hi] = predict_rows(fit_batch(kind, X[train], y[train], seed=seed), X[lo:hi])
    return pred


def cv_spearman(kind: str, X: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Out-of-fold Spearman of one model kind over contiguous (time-ordered) folds."""
    pred = _out_of_fold(kind, X, y, seed)
    return math.nan if pred is None else spearman(pred.tolist(), y.tolist())


def choose_kind(
    X: np.ndarray, y: np.ndarray, *, seed: int = 0, kinds: Sequence[str] = BATCH_KINDS
) -> tuple[str, dict[str, float]]:
    """The batch model kind whose out-of-fold ranking of these labels is best, and every score.

    The ensemble's out-of-fold predictions are its members' averaged (it
    fits each member exactly as that kind alone would), so it costs no fits
    of its own when its members are scored too.
    """
    X, y = X[-SELECTION_WINDOW:], y[-SELECTION_WINDOW:]
    # Members first, so the ensemble's score can reuse their predictions.
    needed = [*EnsembleStage.MEMBERS, *kinds] if "ensemble" in kinds else list(kinds)
    oof: dict[str, np.ndarray | None] = {}
    for k in dict.fromkeys(needed):
        if k == "ensemble":
            parts = [p for m in EnsembleStage.MEMBERS if (p := oof[m]) is not None]
            full = len(parts) == len(EnsembleStage.MEMBERS)
            oof[k] = np.mean(parts, axis=0) if full else None
        else:
            oof[k] = _out_of_fold(k, X, y, seed)
    scores = {
        k: math.nan if (p := oof[k]) is None else spearman(p.tolist(), y.tolist()) for k in kinds
    }
    finite = {k: v for k, v in scores.items() if not math.isnan(v)}
    best = max(finite, key=lambda k: finite[k]) if finite else kinds[-1]
    return best, scores


def run_refit(
    X: np.ndarray,
    y: np.ndarray,
    served: np.ndarray,
    *,
    holdout_fraction: float,
    seed: int,
    model_version: str,
    kinds: Sequence[str] = BATCH_KINDS,
) -> RefitResult:
    """Choose a model kind on the older labels, score it on the newest, refit if it wins.

    The holdout is time-ordered (the most recent ``holdout_fraction``). The
    kind (ridge, kNN, LightGBM, their ensemble) is chosen by out-of-fold ranking of the older
    labels alone, so the holdout judges one candidate, not the best of several.
    The incumbent's score is that of the predictions actually *served* for
    the holdout labels before they were learned: both sides are out of sample.
    """
    n = len(y)
    n_hold = max(3, round(n * holdout_fraction))
    n_train = n - n_hold
    kind, scores = choose_kind(X[:n_train], y[:n_train], seed=seed, kinds=kinds)
    cand = fit_batch(kind, X[:n_train], y[:n_train], seed=seed, model_version=model_version)
    c_score = spearman(predict_rows(cand, X[n_train:]).tolist(), y[n_train:].tolist())
    i_score = spearman(served[n_train:].tolist(), y[n_train:].tolist())
    promoted = should_promote(c_score, i_score)
    final = fit_batch(kind, X, y, seed=seed, model_version=model_version) if promoted else None
    return RefitResult(promoted, c_score, i_score, n_train, n_hold, n, final, kind, scores)


def should_promote(candidate_score: float, incumbent_score: float) -> bool:
    if math.isnan(candidate_score):
        return False
    return math.isnan(incumbent_score) or candidate_score > incumbent_score


# --- the router ---------------------------------------------------------------------


@dataclass
class _History:
    X: list[list[float]] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    served: list[float] = field(default_factory=list)  # prediction served before learning
    # Each online stage's prediction before it learned the label (test-then-
    # train): the evidence on which the router hands over between them.
    heuristic: list[float] = field(default_factory=list)
    river: list[float] = field(default_factory=list)


RefitJob = Callable[[], RefitResult]


class Predictor:
    """Routes scoring to the active stage and learning to all of them.

    Pure: it learns, predicts, snapshots and prepares refits; it never
    touches a file, a thread or a clock. The shell
    (:class:`daemon.runtime.predictor_host.PredictorHost`) persists labels
    and snapshots and runs refit jobs. With ``inline_refits=True`` (replay,
    evaluation, tests) a refit due by label count runs inside :meth:`learn`,
    so two predictors fed the same labels are identical; otherwise
    :meth:`refit_job` hands the work to the shell, which applies the result
    with :meth:`apply_refit`.
    """

    def __init__(
        self,
        settings: PredictorSettings | None = None,
        *,
        inline_refits: bool = True,
        quality_window: int = 200,
        drift_delta: float = 0.002,
    ) -> None:
        self.settings = settings or PredictorSettings()
        self.inline_refits = inline_refits
        self.version = 0
        self.label_seq = 0
        self.heuristic = AdvStdHeuristic("v0")
        self.river = RiverStage(seed=self.settings.seed, model_version="v0")
        self.batch: BatchStage | None = None  # the promoted refit (ridge, kNN, LightGBM, ensemble)
        self.active: str = "heuristic"
        self.quality = OnlineQuality(quality_window)
        self.drift = ResidualDrift(drift_delta)
        self.drift_detected = 0
        self.refits: dict[str, int] = {"promoted": 0, "rejected": 0, "failed": 0}
        self.last_refit: RefitResult | None = None
        self.holdout_score: float | None = None
        self._history = _History()
        self._labels_at_refit = 0
        self._refit_requested = False
        self._refit_running = False

    # -- the contract --

    @property
    def stage(self) -> str:
        return self.active

    @property
    def model_version(self) -> str:
        return f"v{self.version}"

    @property
    def n_labels(self) -> int:
        return len(self._history.y)

    def _active_stage(self) -> PredictorStage:
        if self.active in BATCH_KINDS and self.batch is not None:
            return self.batch
        return self.river if self.active == "river" else self.heuristic

    def predict(self, features: Mapping[str, float]) -> Prediction:
        if not has_learning_signal(features):
            feature_vector(features)  # the same validation as a stage's
            return Prediction(0.0, 0.0, self.active, self.model_version)
        p = self._active_stage().predict(features)
        return Prediction(p.lift, p.uncertainty, self.active, self.model_version)

    def learn(
        self, features: Mapping[str, float], realized_lift: float, selection: str = "exploit"
    ) -> None:
        """Learn one label; raises a ``ValueError`` naming a bad feature or label."""
        x = feature_vector(features)
        y = _check_label(realized_lift)
        served = self.predict(features).lift
        signal = has_learning_signal(features)
        self._history.heuristic.append(self.heuristic.predict(features).lift if signal else 0.0)
        self._history.river.append(self.river.predict(features).lift if signal else 0.0)
        self.quality.update(served, y, selection)
        if self.drift.update(y - served, self.river.lift_spread):
            self.drift_detected += 1
            self._refit_requested = True
        self.heuristic.learn(features, y)
        self.river.learn(features, y)
        self._history.X.append(x)
        self._history.y.append(y)
        self._history.served.append(served)
        if self.active in ("heuristic", "river") and self.n_labels >= self.settings.river_after:
            better = self._better_online_stage()
            if better != self.active:
                # A handover between the online stages often follows a
                # change in the world: it must not hide that change from
                # the drift detector.
                self._promote(better, reset_drift=False)
        if self.inline_refits and self.refit_due():
            job = self.refit_job()
            try:
                result: RefitResult | BaseException = job()
            except Exception as exc:
                result = exc
            self.apply_refit(result)

    # -- promotion and refits --

    # Labels over which the online stages are compared, and the margin a
    # challenger must win by (so the router does not flap on noise).
    ONLINE_WINDOW = 30
    ONLINE_MARGIN = 0.05
    ONLINE_EVIDENCE = 12  # labels before the comparison is trusted

    def _better_online_stage(self) -> str:
        """The online stage whose test-then-train ranking of recent labels is better.

        River takes over at ``river_after`` labels; once enough labels have
        been seen, the stage that ranked the recent ones better (by a margin)
        serves, so the router can hand back to the disagreement heuristic:
        with few labels and many features River can rank worse than it.
        """
        if self.n_labels < self.ONLINE_EVIDENCE:
            return "river"
        w = self.ONLINE_WINDOW
        y = self._history.y[-w:]

        def score(preds: list[float]) -> float:
            rho = spearman(preds[-w:], y)
            return -math.inf if math.isnan(rho) else rho

        h, r = score(self._history.heuristic), score(self._history.river)
        if self.active == "heuristic":
            return "river" if r > h + self.ONLINE_MARGIN else "heuristic"
        return "heuristic" if h > r + self.ONLINE_MARGIN else "river"

    def _promote(self, stage: str, *, reset_drift: bool = True) -> None:
        self.active = stage
        self.version += 1
        self.river.model_version = self.model_version
        if reset_drift:
            # The residual distribution of a new model is a new baseline.
            self.drift.reset()

    @property
    def new_labels_since_refit(self) -> int:
        return self.n_labels - self._labels_at_refit

    def refit_due(self) -> bool:
        """A refit is due by label count or because drift asked for one."""
        if self.n_labels < self.settings.lgbm_after or self._refit_running:
            return False
        new = self.new_labels_since_refit
        return new >= self.settings.refit_every_labels or (self._refit_requested and new > 0)

    def refit_job(self) -> RefitJob:
        """The refit of the labels so far, as a job that touches none of this object's state.

        Marks a refit as running until :meth:`apply_refit` receives its result.
        """
        if self.n_labels < 4:
            raise ValueError(f"refit: needs at least 4 labels, has {self.n_labels}")
        X = np.asarray(self._history.X)
        y = np.asarray(self._history.y)
        served = np.asarray(self._history.served)
        self._labels_at_refit = self.n_labels
        self._refit_requested = False
        self._refit_running = True
        version = f"v{self.version + 1}"
        holdout, seed = self.settings.holdout_fraction, self.settings.seed

        def job() -> RefitResult:
            return run_refit(
                X, y, served, holdout_fraction=holdout, seed=seed, model_version=version
            )

        return job

    def apply_refit(self, result: RefitResult | BaseException) -> RefitResult | None:
        """Promote or reject a finished refit (an exception counts as failed)."""
        self._refit_running = False
        if isinstance(result, BaseException):
            self.refits["failed"] += 1
            return None
        self.last_refit = result
        if result.promoted and result.stage is not None:
            self.refits["promoted"] += 1
            self.batch = result.stage
            self.holdout_score = result.candidate_score
            self._promote(result.stage.stage)
            self.batch.model_version = self.model_version
        else:
            self.refits["rejected"] += 1
        return result

    # -- persistence (as values; the shell writes them) --

    def snapshot(self, created_ts: float = 0.0) -> Snapshot:
        state = {
            "version": self.version,
            "active": self.active,
            "heuristic": self.heuristic,
            "river": self.river,
            "quality": self.quality,
            "drift": self.drift,
            "drift_detected": self.drift_detected,
            "refits": dict(self.refits),
            "history": self._history,
            "labels_at_refit": self._labels_at_refit,
            "refit_requested": self._refit_requested,
            "holdout_score": self.holdout_score,
        }
        manifest = Manifest(
            version=self.version,
            stage=self.active,
            label_seq=self.label_seq,
            n_labels=self.n_labels,
            holdout_score=self.holdout_score,
            feature_schema=FEATURE_SCHEMA,
            created_ts=created_ts,
        )
        # LightGBM models travel as text model strings; ridge and kNN are
        # plain arrays inside the state pickle.
        lgbm = self.batch if isinstance(self.batch, LightGBMStage) else None
        if self.batch is not None and lgbm is None:
            state["batch"] = self.batch
        models = tuple(lgbm.to_strings()) if lgbm is not None else ()
        return Snapshot(manifest, pickle.dumps(state, protocol=5), models)

    def restore(self, snap: Snapshot) -> None:
        m = snap.manifest
        if m.feature_schema != FEATURE_SCHEMA:
            raise ValueError(
                f"feature_schema: snapshot {m.name} has {m.feature_schema!r}, "
                f"this build computes {FEATURE_SCHEMA!r}"
            )
        state = pickle.loads(snap.state)
        self.version = state["version"]
        self.active = state["active"]
        self.heuristic = state["heuristic"]
        self.river = state["river"]
        self.quality = state["quality"]
        self.drift = state["drift"]
        self.drift_detected = state["drift_detected"]
        self.refits = state["refits"]
        self._history = state["history"]
        self._labels_at_refit = state["labels_at_refit"]
        self._refit_requested = state["refit_requested"]
        self._refit_running = False
        self.holdout_score = state["holdout_score"]
        self.label_seq = m.label_seq
        self.batch = (
            LightGBMStage.from_strings(snap.lgbm_models, f"v{m.version}")
            if snap.lgbm_models
            else state.get("batch")
        )

    def __getstate__(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "inline_refits": self.inline_refits,
            "snap": self.snapshot(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["settings"], inline_refits=state["inline_refits"])  # type: ignore[misc]
        self.restore(state["snap"])
