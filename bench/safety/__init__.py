"""`ptst bench safety`: refusal and attack-success rates per prompt set x template x model.

    ptst bench safety --base-url http://127.0.0.1:8000/v1 --model qwen \\
        --templates default,chat:llama,chat:llama-short \\
        --prompts advbench=../shared/data/advbench_harmful_behaviors.csv,builtin-benign

Each prompt is sent as one user message. Templates are applied here with the proxy's own
`enforce_chat`, so the rates measure what the proxy would serve; `default` sends the prompt
untouched (the model's own default system prompt). With `--via-proxy` each `--model` is a
proxy route and the proxy applies its template; `--proxy-config` names the routes' templates
and, where routes declare `trained_with`, fills the PTST matrix (train x test template).

Every answer is appended to a JSONL cache keyed by a hash of (prompt, template, model, request
body), so an interrupted run continues where it stopped and never re-sends a cached prompt.
Refusals are decided by the proxy's refusal detector; an optional LLM judge (bench/judge.py)
adds the PTST paper's 1-5 harmfulness score (attack success = 5) or a judged refusal rate.
Rates come with 95% Wilson intervals.
"""

from ptst.bench.safety._cli import add_arguments, options_from_args, run
from ptst.bench.safety._fetch import complete, fetch_all, judge_all, judge_key
from ptst.bench.safety._plan import DEFAULT_CACHE, Job, Options, plan, targets_for
from ptst.bench.safety._prompts import (
    BUILTIN_SETS,
    PROMPTS_DIR,
    PUBLIC_SETS,
    PromptSet,
    load_prompt_set,
    read_prompts,
    sample,
)
from ptst.bench.safety._report import fmt_rate, markdown_report, plot_rates
from ptst.bench.safety._requests import (
    DEFAULT_TEMPLATE,
    Enforcer,
    JsonlCache,
    Sampling,
    Target,
    cache_key,
    proxy_enforcer,
    request_body,
)
from ptst.bench.safety._results import (
    Cell,
    Paired,
    Row,
    baseline_refusals,
    build_rows,
    cell_of,
    detect_refusal,
    paired,
    ptst_matrix,
    summarize,
)
from ptst.bench.safety._run import Outcome, run_safety

__all__ = [
    "BUILTIN_SETS",
    "DEFAULT_CACHE",
    "DEFAULT_TEMPLATE",
    "PROMPTS_DIR",
    "PUBLIC_SETS",
    "Cell",
    "Enforcer",
    "Job",
    "JsonlCache",
    "Options",
    "Outcome",
    "Paired",
    "PromptSet",
    "Row",
    "Sampling",
    "Target",
    "add_arguments",
    "baseline_refusals",
    "build_rows",
    "cache_key",
    "cell_of",
    "complete",
    "detect_refusal",
    "fetch_all",
    "fmt_rate",
    "judge_all",
    "judge_key",
    "load_prompt_set",
    "markdown_report",
    "options_from_args",
    "paired",
    "plan",
    "plot_rates",
    "proxy_enforcer",
    "ptst_matrix",
    "read_prompts",
    "request_body",
    "run",
    "run_safety",
    "sample",
    "summarize",
    "targets_for",
]
