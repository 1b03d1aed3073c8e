"""The one table of Flax variable-collection names.

Trainable weights live in `params`. Everything else a model keeps between steps is a
non-trainable collection, carried in `TrainState.collections` (name -> tree) and moved after
each optimizer step by the post-update rules of `moejax.train.state_rules`:

- `router_bias`: DeepSeek-V3's per-expert selection bias of the MoE routers (sign rule).
- `lora_bias`: the balancing biases of LoRA expert routers (SMoRA, FlyLoRA; sign rule).
- `lora_frozen`: adapter weights that never train (FlyLoRA's sparse random A).
- `expert_layout`: which stored row of the routed experts holds which expert, and the loads
  since the last re-layout (`moejax.moe.expert_layout`; the window load moves by a sum, the
  rows only by the trainer's re-layout, `moejax.train.expert_relayout`).

Side outputs are sown (`Module.sow`) into collections that `apply` makes mutable when it
wants them (`SIDE_OUTPUTS`) and that are never stored:

- `balance_load`: the step's per-expert load `[E]` of every router that keeps a sign-rule
  bias, at the scope path of that bias, so the load tree mirrors the bias tree.
- `adapter_aux`: the adapters' weighted auxiliary losses, summed into the training loss.
- `adapter_metrics`: the adapters' scalar routing statistics, averaged for logging.
- `layout_load`: the step's `load[E]` of every MoE layer with an `expert_layout`, at the
  scope path of its `window_load`.

Decoding-time and analysis collections, never stored with a run and never created by
`init` (absent, they cost nothing and change nothing):

- `cache`: the decoding key/value cache (`moejax.generate`).
- `router_delta`: a change of the MoE routers' decision at apply time
  (`moejax.moe.router_delta`): per router, `logits` `[E]` added to the scorer's logits
  before the selection rule, and `ranks` `[E]`, which of the rule's ranked choices a token
  may take. Stacked over scanned layers like `router_bias`. `moejax.generate` builds and
  fills it (SCMoE's weak pass, C3PO, rewiring).
- `calibration`: what `moejax.compress.calibrate` records of an MoE block (its FFN input
  and the residual stream before it), sown only while calibrating.
"""

PARAMS = "params"
ROUTER_BIAS = "router_bias"
ADAPTER_BIAS = "lora_bias"
ADAPTER_FROZEN = "lora_frozen"
EXPERT_LAYOUT = "expert_layout"
NON_TRAINABLE = (ROUTER_BIAS, ADAPTER_BIAS, ADAPTER_FROZEN, EXPERT_LAYOUT)
ADAPTER_COLLECTIONS = (ADAPTER_BIAS, ADAPTER_FROZEN)  # the adapters' own, not the base model's

BALANCE_LOAD = "balance_load"
ADAPTER_AUX = "adapter_aux"
ADAPTER_METRICS = "adapter_metrics"
LAYOUT_LOAD = "layout_load"
SIDE_OUTPUTS = (BALANCE_LOAD, ADAPTER_AUX, ADAPTER_METRICS, LAYOUT_LOAD)

CACHE = "cache"
ROUTER_DELTA = "router_delta"
CALIBRATION = "calibration"

# The sign-rule biases and the collection holding the loads that move them.
SIGN_RULE_LOADS = {ROUTER_BIAS: BALANCE_LOAD, ADAPTER_BIAS: BALANCE_LOAD}


def sow_value(module, collection: str, name: str, value) -> None:
    """`module.sow` that keeps the last value (not a tuple of every call): a module called
    twice in one apply (X-LoRA's two passes) reports its final call. Nothing is sown while
    the model initialises, so `init` returns only the variables a model keeps."""
    if module.is_initializing():
        return
    module.sow(collection, name, value, init_fn=lambda: None, reduce_fn=lambda _, x: x)
