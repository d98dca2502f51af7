"""Low-level integer operations Numba does not expose: int32 arithmetic it does not widen, and
count-leading-zeros.

Numba types every integer operation on small integers as int64, and LLVM cannot narrow a
variable arithmetic shift back, so a loop written with ``np.int32`` casts still runs in 64-bit
vector lanes (8 per AVX-512 register). These intrinsics emit 32-bit ``mul``/``add``/``ashr``/
``select`` directly, so the affine passes run 16 lanes wide. Callers prove that nothing
overflows (``qkernels.fixedpoint.fits_int32`` for the int8 kernels,
``qkernels.fixedpoint.centred_lanes`` for the 16-bit ones); a shift count is always below 32.

With ``NUMBA_DISABLE_JIT=1`` the same names are plain Python functions.
"""

from llvmlite import ir
from numba import config, types
from numba.core.extending import intrinsic

if config.DISABLE_JIT:  # pragma: no cover - exercised by the NUMBA_DISABLE_JIT run

    def mul_add_shr(a, x, b, s):
        return (int(a) * int(x) + int(b)) >> int(s)

    def mul_sub_add_shr(a, x, c, b, s):
        return (int(a) * (int(x) - int(c)) + int(b)) >> int(s)

    def pick3(v, lo, hi, below, between, above):
        return above if v >= hi else (below if v <= lo else between)

    def clamp(t, q):
        return min(max(t, -q), q)

    def round_shr(v, s, s1, bit):
        return (int(v) >> int(s)) + ((int(v) >> int(s1)) & int(bit))

    def clz64(v):
        return 64 - int(v).bit_length() if v >= 0 else 0

else:
    _i32 = types.int32

    @intrinsic
    def mul_add_shr(typingctx, a, x, b, s):
        """``(a*x + b) >> s`` on int32."""
        def codegen(context, builder, sig, args):
            a_, x_, b_, s_ = args
            return builder.ashr(builder.add(builder.mul(a_, x_), b_), s_)
        return _i32(_i32, _i32, _i32, _i32), codegen

    @intrinsic
    def mul_sub_add_shr(typingctx, a, x, c, b, s):
        """``(a*(x - c) + b) >> s`` on int32 (the centred affine of the int16 kernels)."""
        def codegen(context, builder, sig, args):
            a_, x_, c_, b_, s_ = args
            d = builder.sub(x_, c_)
            return builder.ashr(builder.add(builder.mul(a_, d), b_), s_)
        return _i32(_i32, _i32, _i32, _i32, _i32), codegen

    @intrinsic
    def pick3(typingctx, v, lo, hi, below, between, above):
        """``above`` if v >= hi, ``below`` if v <= lo, else ``between`` (int32 operands)."""
        def codegen(context, builder, sig, args):
            v_, lo_, hi_, below_, between_, above_ = args
            low = builder.select(builder.icmp_signed("<=", v_, lo_), below_, between_)
            return builder.select(builder.icmp_signed(">=", v_, hi_), above_, low)
        return _i32(_i32, _i32, _i32, _i32, _i32, _i32), codegen

    @intrinsic
    def clamp(typingctx, t, q):
        """``t`` clamped to ``[-q, q]`` (int32)."""
        def codegen(context, builder, sig, args):
            t_, q_ = args
            neg = builder.neg(q_)
            t_ = builder.select(builder.icmp_signed("<", t_, q_), t_, q_)
            return builder.select(builder.icmp_signed(">", t_, neg), t_, neg)
        return _i32(_i32, _i32), codegen

    @intrinsic
    def round_shr(typingctx, v, s, s1, bit):
        """``(v >> s) + ((v >> s1) & bit)`` on int32: with ``s1 = s - 1`` and ``bit = 1``,
        ``v / 2**s`` rounded half up for every int32 ``v`` (the sum ``v + 2**(s-1)`` could
        overflow); with ``bit = 0``, ``v >> s``."""
        def codegen(context, builder, sig, args):
            v_, s_, s1_, bit_ = args
            return builder.add(builder.ashr(v_, s_), builder.and_(builder.ashr(v_, s1_), bit_))
        return _i32(_i32, _i32, _i32, _i32), codegen

    @intrinsic
    def clz64(typingctx, v):
        """Count of leading zero bits of an int64 (64 for 0): LLVM's ctlz, one instruction."""
        def codegen(context, builder, sig, args):
            i64 = ir.IntType(64)
            fnty = ir.FunctionType(i64, [i64, ir.IntType(1)])
            fn = builder.module.declare_intrinsic("llvm.ctlz", [i64], fnty)
            return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 0)])
        return types.int64(types.int64), codegen
