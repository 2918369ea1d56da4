"""Zero-shot accuracy through lm-eval's Python API, on the model already in memory.

The seven tasks of the published tables need their data from the Hugging Face hub. When
the hub cannot be reached (or --offline), lorap runs its local proxy tasks instead (see
proxy_tasks.py) and labels them as proxies. Nothing here retries a network: reachability
is asked once, with a short timeout (lorap.network), and the answer is said plainly.

lm-eval runs every task and computes every metric. The proxies' log-likelihoods are scored by
lorap's SharedContextLM (shared_context.py), which gives lm-eval's numbers with each context
run once; the standard tasks are scored by lm-eval's own HFLM.
"""
import logging

from ..errors import LorapError
from ..log import info
from .proxy_tasks import PROXY_DESCRIPTIONS, PROXY_TASKS, file_sha256, proxy_task_folder

STANDARD_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# The metric each published table quotes (LLM-Pruner / LoRAP convention); both are reported.
PUBLISHED_METRIC = {
    "boolq": "acc",
    "piqa": "acc",
    "winogrande": "acc",
    "arc_easy": "acc",
    "hellaswag": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
    # Proxies: the cloze task has only acc; the ending task is HellaSwag-like.
    "lorap_wiki_cloze": "acc",
    "lorap_wiki_ending": "acc_norm",
}
TASK_SETS = {"standard": STANDARD_TASKS, "proxies": PROXY_TASKS}
ALIASES = {"wiki_cloze": "lorap_wiki_cloze", "wiki_ending": "lorap_wiki_ending", "arc_e": "arc_easy", "arc_c": "arc_challenge", "obqa": "openbookqa"}
DEFAULT_BATCH_SIZE = 8
NO_HUB = "the Hugging Face hub cannot be reached"


def choose_tasks(requested: list[str] | None, offline: bool = False) -> tuple[list[str], str | None, bool]:
    """(task names, a note for the report or None, whether unavailable standard tasks may be
    replaced by the proxies). Says plainly when the hub is out of reach."""
    from ..io.network import force_offline, hub_reachable

    online = not offline and hub_reachable()
    if not online:
        force_offline()  # lm-eval and datasets must not sit in network retries
    if requested is None:
        if offline:
            note = "--offline was given: ran lorap's offline proxy tasks instead of the seven standard tasks"
            info(note)
            return list(PROXY_TASKS), note, False
        # Online, or offline by circumstance: the standard tasks whose data can be had (from
        # the hub, or the local datasets cache), the proxies in place of the others.
        return list(STANDARD_TASKS), None, True
    tasks: list[str] = []
    for name in requested:
        for task in TASK_SETS.get(name, (ALIASES.get(name, name),)):
            if task not in tasks:
                tasks.append(task)
    needs_hub = [t for t in tasks if t not in PROXY_TASKS]
    if needs_hub and not online:
        # Still tried: datasets may find them in its local cache (HF_DATASETS_OFFLINE=1 makes
        # that quick). A miss becomes a plain error in load_tasks.
        why = "--offline was given" if offline else NO_HUB
        info(f"{why}; {', '.join(needs_hub)} will run only if their data is in the local datasets cache")
    return tasks, None, False


def task_manager(tasks: list[str]):
    """lm-eval's task index, with lorap's proxy folder added when a proxy is asked for."""
    from lm_eval.tasks import TaskManager

    include = str(proxy_task_folder()) if any(t in PROXY_TASKS for t in tasks) else None
    # Indexing lm-eval's thousands of built-in YAML files takes seconds; proxies need none.
    only_proxies = all(t in PROXY_TASKS for t in tasks)
    return TaskManager(include_path=include, include_defaults=not only_proxies)


def load_tasks(tasks: list[str], manager) -> dict:
    """{name: lm-eval Task}, one at a time so a task whose data cannot be had is named."""
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LorapError(
            f"unknown zero-shot task(s): {', '.join(unknown)}. Use lm-eval task names, e.g. "
            f"{', '.join(STANDARD_TASKS)}, or 'standard' / 'proxies' ({', '.join(PROXY_TASKS)})"
        )
    loaded = {}
    for name in tasks:
        try:
            loaded.update(manager.load([name])["tasks"])
        except Exception as err:  # datasets and the hub raise many types; all mean "no data"
            from ..io.network import hub_reachable

            where = "" if hub_reachable() else f" ({NO_HUB} and it is not in the local datasets cache)"
            raise LorapError(
                f"could not load the data of zero-shot task '{name}'{where}: {err}. "
                "Use --tasks proxies (lorap's local tasks), or run where the hub can be reached."
            ) from err
    return loaded


def prepare(tasks: list[str], replace_missing: bool = False):
    """Check task names and fetch their data now, before any model is loaded, so a missing
    dataset fails in seconds rather than after a perplexity run.

    Returns (task manager, tasks to run, note or None). With `replace_missing`, standard
    tasks whose data cannot be had are dropped and the offline proxies run in their place.
    """
    if not replace_missing:
        manager = task_manager(tasks)
        load_tasks(tasks, manager)
        return manager, tasks, None
    manager = task_manager([*tasks, *PROXY_TASKS])
    available, missing = [], []
    for name in tasks:
        try:
            load_tasks([name], manager)
            available.append(name)
        except LorapError:
            missing.append(name)
    if not missing:
        return manager, available, None
    from ..io.network import hub_reachable

    why = NO_HUB + " and they are not in the local datasets cache" if not hub_reachable() else "their data could not be loaded"
    note = f"no data for {', '.join(missing)} ({why}): ran lorap's offline proxy tasks in their place"
    info(note)
    return manager, [*available, *PROXY_TASKS], note


def _data_record(name: str, config: dict, proxy: bool) -> dict:
    if proxy:
        data_file = config["dataset_kwargs"]["data_files"]["test"]
        return {"file": data_file, "sha256": file_sha256(data_file), "split": "wiki test (lorap build)"}
    return {
        "dataset": config.get("dataset_path"),
        "config": config.get("dataset_name"),
        "split": config.get("test_split") or config.get("validation_split"),
    }


def summarize(results: dict, limit: int | None) -> dict:
    """lm-eval's results -> {task: {acc, acc_stderr, acc_norm, acc_norm_stderr, ...}}."""
    table = {}
    for name, metrics in results["results"].items():
        if name not in results["n-samples"]:
            continue  # a group's aggregate row; its tasks are listed on their own
        proxy = name in PROXY_TASKS
        config = results["configs"][name]
        row = {
            "proxy": proxy,
            "description": PROXY_DESCRIPTIONS.get(name, "lm-eval standard task"),
            "published_metric": PUBLISHED_METRIC.get(name, "acc"),
            "n": results["n-samples"][name]["effective"],
            "n_available": results["n-samples"][name]["original"],
            "limit": limit,
            "num_fewshot": results["n-shot"].get(name, 0),
            "data": _data_record(name, config, proxy),
        }
        for metric in ("acc", "acc_norm", "perplexity"):
            row[metric] = metrics.get(f"{metric},none")
            row[f"{metric}_stderr"] = _number(metrics.get(f"{metric}_stderr,none"))
        if row["perplexity"] is None:
            del row["perplexity"], row["perplexity_stderr"]
        table[name] = row
    return table


def _number(value):
    return value if isinstance(value, (int, float)) else None  # lm-eval writes "N/A" when it has none


def headline(row: dict) -> float | None:
    """The number a table would quote: the published metric, or acc where that is missing."""
    return row.get(row["published_metric"]) if row.get(row["published_metric"]) is not None else row.get("acc")


def average(table: dict) -> float | None:
    values = [headline(row) for row in table.values()]
    return sum(values) / len(values) if values and None not in values else None


def evaluate_zeroshot(model, tokenizer, tasks: list[str], limit: int | None = None,
                      batch_size: int | str = DEFAULT_BATCH_SIZE, seed: int = 0, manager=None,
                      share_contexts: bool = True) -> dict:
    """Run `tasks` 0-shot on the in-memory model; returns summarize()'s table.

    Tasks are loaded afresh for every model (from the local datasets cache after the first
    time): lm-eval keeps per-run state in its Task objects. `share_contexts=False` scores the
    proxies with lm-eval's HFLM too (the slower reference the shared scorer is checked against);
    `batch_size` counts requests per forward pass for HFLM, contexts per pass for the proxies.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from .shared_context import SharedContextLM

    if limit is not None and limit <= 0:
        raise LorapError(f"--limit must be a positive number of examples per task, got {limit}")
    manager = manager or task_manager(tasks)
    loaded = load_tasks(tasks, manager)
    if share_contexts:
        lm = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, shared_tasks=PROXY_TASKS)
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-request INFO lines drown the progress
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(loaded.values()),
        num_fewshot=0,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=1000,  # only the cloze perplexity's stderr is bootstrapped; 1000 is plenty
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return summarize(results, limit)
