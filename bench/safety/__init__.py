"""`ptst bench safety`: refusal and attack-success rates per prompt set x template x model,
and task accuracy (GSM8K exact match) per task set x template x model beside them.

    ptst bench safety --base-url http://127.0.0.1:8000/v1 --model qwen \\
        --templates default,chat:llama,chat:llama-short \\
        --prompts advbench=../shared/data/advbench_harmful_behaviors.csv,builtin-benign \\
        --tasks gsm8k=../shared/data/gsm8k/test.jsonl --task-limit 200

Each prompt is sent as one user message. Templates are applied here with the proxy's own
`enforce_chat`, so the rates measure what the proxy would serve; `default` sends the prompt
untouched (the model's own default system prompt). With `--via-proxy` each `--model` is a
proxy route and the proxy applies its template; `--proxy-config` names the routes' templates
and, where routes declare `trained_with`, fills the PTST matrix (train x test template).

Every answer is appended to a JSONL cache keyed by a hash of (prompt, template, model, request
body), so an interrupted run continues where it stopped and never re-sends a cached prompt.
Refusals are decided by the proxy's refusal detector; an optional LLM judge (bench/judge.py)
adds the PTST paper's 1-5 harmfulness score (attack success = 5) or a judged refusal rate.
Task questions go out the same way (same templating, cache and concurrency) with their own
max_tokens and are scored by exact match of the final number (`_tasks`), so every report shows
what a template costs in helpfulness next to what it buys in refusals. Rates come with 95%
Wilson intervals.
"""

from ptst.bench.safety._cli import add_arguments, options_from_args, run
from ptst.bench.safety._fetch import complete, fetch_all, judge_all, judge_key
from ptst.bench.safety._plan import (
    DEFAULT_CACHE,
    DEFAULT_TASK_MAX_TOKENS,
    Job,
    Options,
    plan,
    plan_tasks,
    targets_for,
)
from ptst.bench.safety._prompts import (
    BUILTIN_SETS,
    PROMPTS_DIR,
    PUBLIC_SETS,
    PromptSet,
    load_prompt_set,
    read_prompts,
    sample,
)
from ptst.bench.safety._report import fmt_rate, markdown_report, plot_accuracy, plot_rates
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
    TaskCell,
    TaskRow,
    baseline_refusals,
    build_rows,
    build_task_rows,
    cell_of,
    detect_refusal,
    paired,
    ptst_matrix,
    summarize,
    summarize_tasks,
    task_cell_of,
)
from ptst.bench.safety._run import Outcome, run_safety
from ptst.bench.safety._tasks import (
    ANSWER_RULES,
    Score,
    TaskSet,
    extract_answer,
    gold_number,
    load_task_set,
    read_tasks,
    score_answer,
    to_decimal,
)

__all__ = [
    "ANSWER_RULES",
    "BUILTIN_SETS",
    "DEFAULT_CACHE",
    "DEFAULT_TASK_MAX_TOKENS",
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
    "Score",
    "Target",
    "TaskCell",
    "TaskRow",
    "TaskSet",
    "add_arguments",
    "baseline_refusals",
    "build_rows",
    "build_task_rows",
    "cache_key",
    "cell_of",
    "complete",
    "detect_refusal",
    "extract_answer",
    "fetch_all",
    "fmt_rate",
    "gold_number",
    "judge_all",
    "judge_key",
    "load_prompt_set",
    "load_task_set",
    "markdown_report",
    "options_from_args",
    "paired",
    "plan",
    "plan_tasks",
    "plot_accuracy",
    "plot_rates",
    "proxy_enforcer",
    "ptst_matrix",
    "read_prompts",
    "read_tasks",
    "request_body",
    "run",
    "run_safety",
    "sample",
    "score_answer",
    "summarize",
    "summarize_tasks",
    "targets_for",
    "task_cell_of",
    "to_decimal",
]
