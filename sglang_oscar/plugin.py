"""SGLang plugin (entry point group `sglang.srt.plugins`): loaded in every SGLang process.

Inert unless the launcher set SGLANG_OSCAR_CONFIG. Then it registers the `oscar` attention
backend and these hooks (SGLang's HookRegistry; each is verified when the backend is built, since
the registry only logs failures):
  pool class     KVCacheConfigurator._resolve_kv_pool_class -> OscarKVPool for MHA, refuse MLA/DSA
  residual rows  KVCacheConfigurator._build_token_to_kv_pool  -> request-row count for the residual
  sizing         DefaultPoolConfigurator.__init__             -> real packed bytes per token + residual
  fused KV write models.utils.enable_fused_set_kv_buffer      -> False (it would bypass the pool)
  V rotation     ModelRunner.maybe_apply_post_load_model_transforms -> fold H into v_proj / o_proj
  reporting      build_server_info / scheduler internal state -> config, fingerprint, pool state;
                 Scheduler.emit_metrics_constants -> the pool's Prometheus gauges (--enable-metrics)
  weight updates SchedulerWeightUpdaterManager's online loads -> refused (400) where V is rotated:
                 new weights would arrive without the fold
The hooks are verified, and the launcher's refusals checked again, where failing stops the launch:
the `oscar` backend's factory, below.
"""
from __future__ import annotations

import hashlib
import logging
import math

from .config import DEBUG_ENV, OscarConfig, current, debug  # noqa: F401 - DEBUG_ENV re-exported

logger = logging.getLogger(__name__)
_registered = False

T_CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
T_POOL_CLASS = T_CONFIGURATOR + "._resolve_kv_pool_class"
T_POOL_BUILD = T_CONFIGURATOR + "._build_token_to_kv_pool"
T_SIZING = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator.__init__"
T_FUSED = "sglang.srt.models.utils.enable_fused_set_kv_buffer"
T_POST_LOAD = "sglang.srt.model_executor.model_runner.ModelRunner.maybe_apply_post_load_model_transforms"
T_SERVER_INFO = "sglang.srt.utils.common.build_server_info"
T_BUDGET = T_CONFIGURATOR + "._profile_available_bytes"
T_STATE = "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController._add_memory_usage"
T_METRICS = "sglang.srt.managers.scheduler.Scheduler.emit_metrics_constants"
T_UPDATER = "sglang.srt.managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager"
# Online weight loads (the session-based tensor/distributed loads all start at begin_weight_update),
# each with the reply type its endpoint turns into a 400 on success=False.
WEIGHT_UPDATES = {"update_weights_from_disk": "UpdateWeightFromDiskReqOutput",
                  "update_weights_from_ipc": "UpdateWeightsFromIPCReqOutput",
                  "begin_weight_update": "BeginWeightUpdateReqOutput"}
WEIGHT_UPDATE_REFUSAL = ("OScaR folded the V Hadamard rotation into v_proj/o_proj when the model loaded; "
                         "weights loaded online would be unfolded and the server would answer wrongly. "
                         "Restart the server with the new weights.")
SCHEDULER_HOOKS = (T_POOL_CLASS, T_POOL_BUILD, T_SIZING, T_FUSED, T_POST_LOAD)


def register() -> None:
    """Entry point. Idempotent: registering twice would double-wrap the AROUND hooks."""
    global _registered
    cfg = current()
    if _registered or cfg is None:
        return
    _registered = True
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if cfg.kv_budget_gb is not None:
        HookRegistry.register(T_BUDGET, lambda original, *a, **k: int(cfg.kv_budget_gb * (1 << 30)),
                              HookType.AROUND)
    if not cfg.quantized:
        return  # plain SGLang (bf16): only the budget hook, if asked for
    if "oscar" not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices(["oscar"])

    register_attention_backend("oscar")(_make_backend)
    HookRegistry.register(T_POOL_CLASS, _pool_class, HookType.AROUND)
    HookRegistry.register(T_POOL_BUILD, _pool_build, HookType.AROUND)
    HookRegistry.register(T_SIZING, _sizing, HookType.AFTER)
    HookRegistry.register(T_FUSED, lambda *a, **k: False, HookType.REPLACE)
    HookRegistry.register(T_POST_LOAD, _fold_v, HookType.AFTER)
    HookRegistry.register(T_SERVER_INFO, _server_info, HookType.AFTER)
    HookRegistry.register(T_STATE, _internal_state, HookType.AFTER)
    HookRegistry.register(T_METRICS, _metrics, HookType.AFTER)
    if cfg.rotate:
        for name, reply in WEIGHT_UPDATES.items():
            HookRegistry.register(f"{T_UPDATER}.{name}", _refuse_weight_update(reply), HookType.REPLACE)


def _make_backend(model_runner):
    """The `oscar` attention backend's factory, run in each scheduler process."""
    # A server started by SGLang's own launcher with the config in the environment skipped the
    # OScaR launcher's refusals: judge the arguments this server actually runs with, here.
    from .launch_server import serve_problem  # lazily: the launcher imports this module
    msg = serve_problem(model_runner.server_args, current())
    if msg:
        raise RuntimeError(f"sglang_oscar: {msg}")
    verify_hooks(model_runner)
    from .backend import OscarAttnBackend
    return OscarAttnBackend(model_runner)


# ---- hooks -----------------------------------------------------------------------------------
def _pool_class(original, self, *, kind, default):
    if kind == "mha" and not getattr(self, "is_draft_worker", False):
        from .pool import OscarKVPool
        return OscarKVPool
    return original(self, kind=kind, default=default)


def _pool_build(original, self, *args, **kwargs):
    from . import pool
    if getattr(self, "use_mla_backend", False):
        raise RuntimeError("OScaR KV quantization supports MHA/GQA models only, not MLA/DSA")
    rtp = kwargs.get("req_to_token_pool")
    pool.residual_rows_hint = rtp.size + 1 if rtp is not None else None  # + SGLang's padding row 0
    return original(self, *args, **kwargs)


_sizing_applied = False


def _sizing(result, self, kvc, *args, **kwargs):
    """Charge SGLang's pool sizing the real packed bytes per token and the fixed residual."""
    global _sizing_applied
    from sglang.srt.model_executor import pool_configurator as pc
    from . import layout
    from .pool import norm_rows_needed, residual_bytes

    cfg = current()
    mc = kvc.model_config
    heads = mc.get_num_kv_heads(pc.get_parallel().attn_tp_size)
    layers = kvc.layer_info.num_effective_layers
    self._cell_size = math.ceil(layout.bytes_per_token(heads, mc.head_dim, cfg.bits) * layers)
    rows = (kvc.server_args.max_running_requests or 0) + 2  # + padding row, + slack
    itemsize = 2  # residual K/V in the model dtype (bf16/fp16)
    self._fixed_overhead_bytes += residual_bytes(rows, cfg.page_size, heads, mc.head_dim, layers, itemsize,
                                                 norm_rows_needed(cfg))
    _sizing_applied = True


def _fold_v(result, runner, *args, **kwargs):
    cfg = current()
    if not cfg.rotate or getattr(runner, "is_draft_worker", False):
        runner._oscar_v_folded = True
        return
    from .fold import fold_v_rotation
    n = 0
    for mod in runner.model.modules():
        qkv, o = getattr(mod, "qkv_proj", None), getattr(mod, "o_proj", None)
        if qkv is None or o is None or not hasattr(mod, "kv_size"):
            continue
        w = qkv.weight
        if w.dtype not in (_torch().bfloat16, _torch().float16, _torch().float32):
            raise RuntimeError(f"OScaR folds the V rotation into v_proj/o_proj; quantized weights "
                               f"({w.dtype}) are not supported")
        vs = slice(mod.q_size + mod.kv_size, mod.q_size + 2 * mod.kv_size)
        bias = qkv.bias[vs] if getattr(qkv, "bias", None) is not None else None
        fold_v_rotation(w.data[vs], o.weight.data, mod.head_dim, bias.data if bias is not None else None)
        n += 1
    if n == 0:
        raise RuntimeError("OScaR: found no qkv_proj/o_proj attention modules to fold the V rotation into "
                           "(supported: Llama/Qwen2/Qwen3/Mistral-family models)")
    runner._oscar_v_folded = True
    logger.info("OScaR: folded the V Hadamard into v_proj/o_proj of %d layers", n)


def _refuse_weight_update(reply: str):
    def refuse(*args, **kwargs):
        from sglang.srt.managers import io_struct
        fields = {"success": False, "message": WEIGHT_UPDATE_REFUSAL}
        if reply == "UpdateWeightFromDiskReqOutput":
            fields["num_paused_requests"] = 0
        return getattr(io_struct, reply)(**fields)
    return refuse


def _torch():
    import torch
    return torch


def _server_info(result, *args, **kwargs):
    result["oscar"] = oscar_info(current())
    return result


def oscar_info(cfg: OscarConfig) -> dict:
    return {"method": cfg.method, "bits": cfg.bits, "page_size": cfg.page_size,
            "prefill": cfg.prefill, "fingerprint": cfg.fingerprint()}


def _internal_state(result, controller, state, *args, **kwargs):
    try:
        state["oscar"] = pool_state(controller.scheduler)
    except Exception as e:  # noqa: BLE001 - a report must never take the scheduler down
        logger.exception("OScaR pool state report failed")
        state["oscar"] = {"error": repr(e)}


def pool_state(sched) -> dict:
    from .report import kv_summary
    alloc = sched.token_to_kv_pool_allocator
    s = kv_summary(alloc.get_kvcache())
    info = {k: s[k] for k in ("fingerprint", "bytes_per_token", "bf16_bytes_per_token", "compression",
                              "packed_bytes", "residual_bytes", "total_bytes")}
    info.update(available_tokens=int(alloc.available_size()),
                evictable_tokens=int(sched.tree_cache.evictable_size()),
                max_total_num_tokens=int(sched.max_total_num_tokens))
    if debug():
        info["page_digests"] = page_digests(alloc)
        info["tree_check"] = tree_check(sched)
    return info


_gauges = None


def _metrics(result, sched, *args, **kwargs):
    """Prometheus gauges of the pool beside SGLang's own constants (same labels, same process)."""
    global _gauges
    collector = getattr(sched, "metrics_collector", None)
    if collector is None:
        return
    from prometheus_client import Gauge  # after SGLang set PROMETHEUS_MULTIPROC_DIR
    from .report import kv_summary
    if _gauges is None:
        doc = {"bytes_per_token": "OScaR: stored KV bytes per token over all layers (packed pages).",
               "capacity_tokens": "OScaR: tokens the packed KV pool holds.",
               "compression_ratio": "OScaR: bf16 KV bytes per token / packed KV bytes per token."}
        _gauges = {k: Gauge(f"sglang:oscar_kv_{k}", d, labelnames=list(collector.labels),
                            multiprocess_mode="mostrecent") for k, d in doc.items()}
    s = kv_summary(sched.token_to_kv_pool_allocator.get_kvcache())
    for k, v in (("bytes_per_token", s["bytes_per_token"]), ("capacity_tokens", sched.max_total_num_tokens),
                 ("compression_ratio", s["compression"])):
        _gauges[k].labels(**collector.labels).set(v)


def tree_check(sched) -> dict:
    """Radix tree and pool consistency, run in the scheduler.

    Walks the tree through the tree core's slot walk (the one interface the Python and the Rust tree
    cores both implement): every cached slot with its depth and predecessor. Tree: only whole pages
    (a partial page never enters the tree), each page's slots consecutive and in token order, no page
    cached twice, none on the free list, the padding page never cached, and the evictable/protected
    counters equal to a recount. Pool: SGLang's own conservation check (available + evictable +
    protected + running requests' private KV == total).
    """
    import torch
    problems = []

    def bad(msg):
        if len(problems) < 8:
            problems.append(msg)

    out = {"ok": False, "problems": problems}
    try:
        tree, alloc = sched.tree_cache, sched.token_to_kv_pool_allocator
        core, page = tree.tree_core, alloc.page_size
        walk = core.walk_for_kv_canary(unlocked_only=False, swa_resident_only=False)
        slots, pos, prev = (t.to(torch.int64) for t in (walk.slot_indices, walk.positions,
                                                         walk.prev_slot_indices))
        if bool((slots % page != pos % page).any()):
            bad("a slot sits at a different page offset than its token")
        inner = pos % page != 0
        if bool((prev[inner] != slots[inner] - 1).any()):
            bad("a page's slots are not consecutive in token order")
        pages, counts = torch.unique(slots // page, return_counts=True)
        if slots.numel() != torch.unique(slots).numel():
            bad(f"{slots.numel() - torch.unique(slots).numel()} slots cached twice")
        if bool((counts != page).any()):
            bad(f"{int((counts != page).sum())} pages cached partially")
        if bool((pages <= 0).any()):
            bad("the padding page 0 is cached")
        free = alloc.get_all_free_pages()
        if free is not None and bool(torch.isin(pages, free.to(torch.int64)).any()):
            bad("tree references pages on the free list")
        unlocked = core.walk_for_kv_canary(unlocked_only=True, swa_resident_only=False)
        evictable = int(unlocked.slot_indices.numel())
        protected = int(slots.numel()) - evictable
        if evictable != tree.evictable_size() or protected != tree.protected_size():
            bad(f"counters evictable {tree.evictable_size()} protected {tree.protected_size()}, "
                f"recount {evictable} / {protected}")
        out.update(core=type(core).__name__, pages=int(pages.numel()), tree_tokens=int(slots.numel()))
        checker = sched.invariant_checker
        uncached, _ = checker._get_total_uncached_sizes()
        leak, msg = checker._check_full_pool(checker.pool_stats_observer.get_pool_stats(), uncached=uncached)
        out["pool_invariant"] = msg
        if leak:
            bad("pool conservation violated: " + msg)
        out["ok"] = not problems
    except Exception as e:  # noqa: BLE001 - a report must never take the scheduler down
        bad(f"check failed: {e!r}")
    return out


def _synchronize(device) -> None:
    """Wait for all device work launched so far (on a CPU every step has already finished)."""
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def page_digests(alloc) -> dict:
    """sha256 of every in-use page's packed bytes over all layers (pages not on the free list).

    Runs on the scheduler thread between batches, where the allocator's free list is consistent;
    with the overlap scheduler the batch launched last may still be writing pages on the device,
    so this first waits for it, then copies each field's in-use pages to the host in one transfer.
    """
    import torch
    pool = alloc.get_kvcache()
    free = set(alloc.free_pages.tolist())
    if getattr(alloc, "release_pages", None) is not None:  # pages staged for sorted release
        free |= set(alloc.release_pages.tolist())
    used = [p for p in range(1, pool.num_pages) if p not in free]
    if not used:
        return {}
    _synchronize(pool.device)
    hashes = [hashlib.sha256() for _ in used]
    for layer in pool.pages:
        index = torch.tensor(used, device=layer["k_codes"].device)
        for f in sorted(layer):
            host = layer[f].index_select(0, index).cpu()
            rows = host.view(torch.uint8).reshape(len(used), -1).numpy()
            for h, row in zip(hashes, rows):
                h.update(row.tobytes())
    return {str(p): h.hexdigest()[:16] for p, h in zip(used, hashes)}


# ---- verification (called where failing stops the launch: the backend factory) -----------------
def verify_hooks(runner) -> None:
    import pkgutil

    from .pool import OscarKVPool
    pool = runner.token_to_kv_pool
    if not isinstance(pool, OscarKVPool):
        raise RuntimeError(f"the oscar backend needs the OScaR KV pool, got {type(pool).__name__} "
                           "(the plugin's pool hook did not take effect)")
    missing = []
    targets = list(SCHEDULER_HOOKS)
    if current().rotate:
        targets += [f"{T_UPDATER}.{name}" for name in WEIGHT_UPDATES]
    for target in targets:
        mod, attr = target.rsplit(".", 1)
        fn = getattr(pkgutil.resolve_name(mod), attr)
        if not hasattr(fn, "__wrapped__"):
            missing.append(target)
    if not _sizing_applied:
        missing.append(T_SIZING + " (did not run)")
    if not getattr(runner, "_oscar_v_folded", False):
        missing.append(T_POST_LOAD + " (V rotation not folded)")
    if missing:
        raise RuntimeError("OScaR plugin hooks did not take effect: " + ", ".join(missing))
