"""Import-only stand-in for `sgl_kernel` on CPU machines without AMX.

SGLang's CPU engine imports a handful of names from `sgl_kernel` at module level, but the
real PyPI wheel is CUDA-only and fails to import without libcuda. Without AMX, every CPU layer
takes its pure-torch path, so serving calls none of these names. Any name resolves to a
function that raises if it is ever called, except the one op SGLang's allocator may use.
"""

__version__ = "0.0.0+cpushim"


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset,
                                 out_cache_loc, pool_len):
    """req_to_token[row_i, start_i:end_i] = the next (end_i - start_i) entries of out_cache_loc."""
    offset = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        n = end - start
        if n > 0:
            req_to_token[row, start:end] = out_cache_loc[offset:offset + n].to(req_to_token.dtype)
        offset += n


def _unavailable(name):
    def op(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not available in the CPU import shim")
    op.__name__ = name
    return op


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable(name)
