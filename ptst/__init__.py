"""ptst-proxy: an OpenAI-compatible proxy in front of vLLM that enforces safe-testing templates.

The import root of everything the wheel installs. In the repository the subpackages sit at the
top level, where a reader looks for them, and `ptst/` links to them:

    ptst.proxy      the request path (proxy/)
    ptst.commands   the `ptst` command and its subcommands (commands/)
    ptst.engine     the vLLM launcher, the demo models, `ptst up` (engine/)
    ptst.bench      load, overhead, safety and detector benchmarks (bench/)
    ptst.templates  the shipped template files (templates/, data only)
"""

from importlib import metadata

try:
    __version__ = metadata.version("ptst-proxy")
except metadata.PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"
