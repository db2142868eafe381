"""Compile a Triton kernel for an H100 (sm_90) without a GPU and read its resource usage; used by the kernel
tests' compile checks (`conftest.assert_compiles_for_h100`), which run it in a subprocess."""
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def resource_usage(kernel, signature: dict, constants: dict, attrs: dict, cuobjdump: str, **options) -> dict:
    """{"stack": local-memory bytes per thread (register spills), "shared": shared-memory bytes} of ``kernel``."""
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        dump = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {"stack": int(re.search(r"STACK:(\d+)", dump).group(1)), "shared": compiled.metadata.shared}
