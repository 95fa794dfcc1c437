"""The closed loop's study-file switches (``loop:``, tuner.closed_loop), read and checked."""

from __future__ import annotations

from typing import Any

from tuner.errors import UserError

# The closed loop's rules (tuner.closed_loop), each a study-file switch: `loop: {widen: false}`.
LOOP_DEFAULTS: dict[str, Any] = {
    "widen": True,  # a best value at a non-natural edge widens its range; the stage goes on
    # A stage's top trials retrained on other seeds; the incumbent an earlier stage re-scored
    # joins them on the values it holds (incumbent: false leaves it out).
    # The run's last stage goes on re-scoring, on up to `last_seeds` more seeds in all, while
    # the run's time lasts: time left there has no later stage to flow to.
    "rescore": {"top": 3, "seeds": 2, "incumbent": True, "last_seeds": 10},
    # A stage stops after this many finished trials (pruned ones too) without a new best, and
    # at least 2 per value it searches (tuner.closed_loop.patience).
    "stagnation": 10,
    # A trial's value is the best mean of its validation metric over this many consecutive
    # epochs, not its luckiest single epoch (tuner.closed_loop.smoothed_peak); 1 or false: off.
    "smooth": 3,
    # The run's last stage: a best trial that peaked in the last 25% of its epochs is trained
    # once more with this many times its epochs (and patience), where the time allows, and the
    # validation metric decides (tuner.closed_loop.follow_up); 1 or false: off.
    "longer": 2,
    # A pruned trial counts against its stage's trial cap (budget.trials) by the share of the
    # epochs it trained, as the stop rule counts it, so the time pruning saves buys more trials
    # (tuner.closed_loop.credit); false: every trial counts one.
    "pruned_credit": True,
}


def read_loop(data: Any, src: str) -> dict[str, Any]:
    """The closed loop's switches: each rule on by default, `false` turns it off."""
    from tuner.config import _positive_int, _reject_unknown  # config imports this module

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{src}: loop is a mapping of switches ({', '.join(LOOP_DEFAULTS)}).")
    _reject_unknown(data, set(LOOP_DEFAULTS), f"{src}: loop")
    loop = {**LOOP_DEFAULTS, **data}
    rescore = loop["rescore"]
    if rescore is True:
        loop["rescore"] = dict(LOOP_DEFAULTS["rescore"])
    elif rescore is not False:
        if not isinstance(rescore, dict):
            raise UserError(
                f"{src}: loop.rescore is false or"
                " {top: N, seeds: N, incumbent: true|false, last_seeds: N}."
            )
        _reject_unknown(rescore, set(LOOP_DEFAULTS["rescore"]), f"{src}: loop.rescore")
        rescore = {**LOOP_DEFAULTS["rescore"], **rescore}
        if rescore["last_seeds"] is False:  # the last stage re-scores as the others do
            rescore["last_seeds"] = rescore["seeds"]
        for key in ("top", "seeds", "last_seeds"):
            _positive_int(rescore[key], f"loop.rescore.{key}", src)
        if not isinstance(rescore["incumbent"], bool):
            raise UserError(
                f"{src}: loop.rescore.incumbent must be true or false,"
                f" got {rescore['incumbent']!r}."
            )
        loop["rescore"] = rescore
    for key in ("widen", "pruned_credit"):
        if not isinstance(loop[key], bool):
            raise UserError(f"{src}: loop.{key} must be true or false, got {loop[key]!r}.")
    if loop["stagnation"] is not False:
        _positive_int(loop["stagnation"], "loop.stagnation", src)
    if loop["smooth"] is False:
        loop["smooth"] = 1
    _positive_int(loop["smooth"], "loop.smooth", src)
    if isinstance(loop["longer"], bool):
        loop["longer"] = LOOP_DEFAULTS["longer"] if loop["longer"] else 1
    _positive_int(loop["longer"], "loop.longer", src)
    return loop
