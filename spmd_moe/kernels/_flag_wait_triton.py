"""The copy-engine exchange's receive wait (spmd_moe.dispatch._transport): one program
spins on the flags the peers set after their copies landed, resets them, and gives up
with a device-side assertion (naming the flag) once the timeout has passed, so a peer
that never sends ends the process in bounded time instead of hanging it."""

# mypy: disable-error-code="no-untyped-def, misc, untyped-decorator, unused-ignore"

import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer


@triton.jit(debug=True)  # debug: the device_assert below is compiled in
def wait_flags_kernel(flags_ptr, first, skip, timeout_ns, N: tl.constexpr):
    """flags[first + j] == 1 for every j in 0..N-1 but ``skip`` (this rank), then 0 again."""
    t0 = globaltimer()
    for j in tl.static_range(N):
        if j != skip:
            v = tl.load(flags_ptr + first + j, volatile=True)
            now = globaltimer()
            while (v != 1) & (now - t0 <= timeout_ns):
                v = tl.load(flags_ptr + first + j, volatile=True)
                now = globaltimer()
            tl.device_assert(v == 1, "spmd_moe copy-engine exchange: a peer's rows never arrived within "
                             "SPMD_MOE_EP_TIMEOUT_S (did a rank fail, or pass a different T?)")
            tl.store(flags_ptr + first + j, 0)
