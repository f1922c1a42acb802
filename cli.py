"""The `tlserve` command line: options in, tables out; the work lives in training/ and serving/.

Each command parses its options, calls one function of the packages and hands the result to one
printer in training/console/tables.py. TensorFlow, BentoML and training.fit.train are imported inside the
commands that need them, so `tlserve --help` stays instant.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import training  # noqa: F401  (sets TensorFlow's environment before anything imports it)
import typer
from rich.console import Console

from serving.base.errors import UserError
from serving.base.formats import BASE_RUNTIMES, BENCH_RUNTIMES, BY_VARIANT, choices
from training.console import tables

app = typer.Typer(
    name="tlserve",
    help="Train, compare, export, serve and benchmark transfer-learning image classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)


def _log(stderr: bool = False, soft_wrap: bool = False) -> Callable[[str], None]:
    """Progress lines: on stdout, or on stderr (where they go when stdout carries JSON); soft_wrap
    keeps a line with a path in it whole."""
    out = err if stderr else console
    return lambda line: out.print(line, highlight=False, soft_wrap=soft_wrap)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


RunsDir = Annotated[Optional[Path], typer.Option("--runs-dir", help="Where runs live (default: $TLSERVE_HOME/runs or ./runs).")]
ModelsDir = Annotated[Optional[Path], typer.Option("--models-dir", help="Where exported models live (default: $TLSERVE_HOME/models or ./models).")]


# ---- training ----------------------------------------------------------------

Data = Annotated[str, typer.Option("--data", help="cifar10 | cifar10:PATH | folder:PATH | synthetic.")]
Classes = Annotated[Optional[str], typer.Option("--classes", help="Subset and re-index: '0-4', '5,7', 'cat,dog'.")]
Backbone = Annotated[str, typer.Option("--backbone", "-b", help="See `tlserve backbones`.")]
Strategy = Annotated[str, typer.Option("--strategy", "-s", help="scratch | frozen | finetune | full.")]
Weights = Annotated[Optional[str], typer.Option("--weights", help="imagenet | none | PATH.h5 (default: imagenet for transfer, none for scratch).")]
InputSize = Annotated[Optional[int], typer.Option("--input-size", help="Resize inside the model to this square size (default: the backbone's).")]
ImageSize = Annotated[Optional[int], typer.Option("--image-size", help="Folder data: resize images to this size on load (default: their own size if they agree, else 224).")]
Head = Annotated[Optional[str], typer.Option("--head", help="gap | gap-dense | flatten-dense-bn (pretrained backbones).")]
CnnLayers = Annotated[str, typer.Option("--cnn-layers", help="CNN body: a preset (seed001..seed004, vgg3, resnet9-s/-m, resnet9; see `tlserve backbones`) or tokens like c32,p,c64,p,f,d128,dr0.5.")]
Unfreeze = Annotated[Optional[int], typer.Option("--unfreeze", help="finetune phase 2: unfreeze the top N backbone layers (default 30).")]
UnfreezeFrom = Annotated[Optional[str], typer.Option("--unfreeze-from", help="finetune phase 2: unfreeze from this backbone layer on.")]
TruncateAt = Annotated[Optional[str], typer.Option("--truncate-at", help="Cut the backbone after this layer (e.g. block3_pool).")]
BnMomentum = Annotated[float, typer.Option(
    "--bn-momentum", help="BatchNorm momentum of cnn-bn, and of a backbone trained with -s scratch.")]
L2 = Annotated[float, typer.Option("--l2", help="L2 factor on conv and dense kernels of the CNN.")]
HeadUnits = Annotated[int, typer.Option(help="Units of the head's hidden Dense layer.")]
CnnPadding = Annotated[Optional[str], typer.Option(help="same | valid (default: the preset's).")]
Track = Annotated[Optional[str], typer.Option(
    "--track", help="Also log to MLflow: mlflow (a local store in ./mlruns) | mlflow:URI (a tracking server or store). "
                    "An unreachable tracker stops the command before it starts.")]


@app.command()
def train(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option("--config", help="A recipe (YAML or JSON; any option below as a key) or a run's record.json; options given here override it.")] = None,
    data: Data = "synthetic",
    backbone: Backbone = "cnn",
    strategy: Strategy = "scratch",
    weights: Weights = None,
    classes: Classes = None,
    val_split: Annotated[float, typer.Option(help="Fraction of train held out for validation when the data has no val split.")] = 0.1,
    limit: Annotated[Optional[int], typer.Option(help="At most N images per split (quick runs).")] = None,
    image_size: ImageSize = None,
    input_size: InputSize = None,
    head: Head = None,
    head_units: HeadUnits = 256,
    dropout: Annotated[float, typer.Option(help="Head dropout rate.")] = 0.2,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random augmentation layers, active in training only.")] = False,
    augment_policy: Annotated[str, typer.Option(help="With --augment: seed (flip/rotation/zoom, as the seeds) | flip-crop (flip + 4-pixel shifts, the fast CIFAR-10 recipe).")] = "seed",
    cnn_layers: CnnLayers = "seed003",
    cnn_padding: CnnPadding = None,
    bn_momentum: BnMomentum = 0.99,
    l2: L2 = 0.0,
    truncate_at: TruncateAt = None,
    unfreeze: Unfreeze = None,
    unfreeze_from: UnfreezeFrom = None,
    from_run: Annotated[Optional[str], typer.Option(help="Start from one of our runs: its layers, a new output layer (seed 004).")] = None,
    train_last: Annotated[int, typer.Option(help="With --from-run: train only the last K layers that have weights.")] = 1,
    teacher: Annotated[Optional[str], typer.Option(help="Distil: learn from this run's probabilities as well as the labels (a run on the same data, classes and split).")] = None,
    distill_temperature: Annotated[float, typer.Option(help="With --teacher: soften both models' probabilities by this temperature.")] = 4.0,
    distill_weight: Annotated[float, typer.Option(help="With --teacher: the share of the loss that matches the teacher (the rest: the labels).")] = 0.5,
    epochs: Annotated[int, typer.Option("--epochs", "-e", help="Epochs (finetune: phase 1).")] = 5,
    finetune_epochs: Annotated[int, typer.Option(help="finetune: phase 2 epochs.")] = 3,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    finetune_lr: Annotated[float, typer.Option(help="finetune: phase 2 learning rate.")] = 1e-5,
    optimizer: Annotated[str, typer.Option(help="adam | sgd | rmsprop.")] = "adam",
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    nesterov: Annotated[bool, typer.Option("--nesterov/--no-nesterov", help="SGD with Nesterov momentum.")] = False,
    weight_decay: Annotated[float, typer.Option(help="Decoupled weight decay on kernels: each step shrinks them by lr x this (0 = off).")] = 0.0,
    schedule: Annotated[str, typer.Option(help="Learning rate: constant | onecycle (warm-up to --lr, cosine to 0) | cosine.")] = "constant",
    label_smoothing: Annotated[float, typer.Option(help="Spread this share of each target over all classes (0 = off).")] = 0.0,
    logit_scale: Annotated[float, typer.Option(help="Scratch CNNs: multiply the logits before softmax (ResNet-9 recipe: 0.125).")] = 1.0,
    tta: Annotated[str, typer.Option(help="none | flip: the saved model averages its logits over each image and its mirror (twice the inference work).")] = "none",
    class_weight: Annotated[str, typer.Option(help="Loss weight per class: none | balanced (n / (classes x count)) | name=weight,... (others 1).")] = "none",
    calibrate: Annotated[bool, typer.Option("--calibrate/--no-calibrate", help="Fit a temperature on the validation split and bake it into the saved model (calibrated probabilities, same top class).")] = True,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 64,
    target: Annotated[float, typer.Option(help="Record the first epoch whose val accuracy reaches this.")] = 0.8,
    patience: Annotated[Optional[int], typer.Option(help="Early stopping patience on val_loss (best weights restored); 0 = off.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed for data splits, shuffles and initial weights.")] = 0,
    name: Annotated[Optional[str], typer.Option(help="Run name (default: backbone-strategy-data-time).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run of the same name.")] = False,
    feature_cache: Annotated[bool, typer.Option("--feature-cache/--no-feature-cache", help="Frozen backbone without augmentation: compute its features once and train the head on them.")] = True,
    precision: Annotated[str, typer.Option(help="auto (mixed_float16 on a GPU, float32 on CPU) | float32 | mixed_float16.")] = "auto",
    jit: Annotated[Optional[bool], typer.Option("--jit/--no-jit", help="XLA compilation (default: on for GPUs, never on CPU).")] = None,
    distribute: Annotated[str, typer.Option(help="auto (MirroredStrategy over >1 GPU; TF_CONFIG: multi-worker) | none | mirrored.")] = "auto",
    data_check: Annotated[str, typer.Option(help="Check the splits for cross-split copies first: off | fast (hashes) | full (+ MobileNetV2 embeddings).")] = "fast",
    drop_leaks: Annotated[bool, typer.Option("--drop-leaks", help="Drop training images that duplicate a val or test image (recorded in the run).")] = False,
    resume: Annotated[Optional[str], typer.Option(help="Continue an interrupted run from its last epoch (other options come from that run).")] = None,
    runs_dir: RunsDir = None,
    track: Track = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the whole record as JSON.")] = False,
) -> None:
    """Train one model and write its run record to runs/<name>/."""
    from training.fit.recipes import merge, train_config  # noqa: PLC0415
    from training.fit.train import resume as resume_training, train as run_training  # noqa: PLC0415

    options = merge(ctx, config) if config else dict(ctx.params)
    json_out, runs_dir = options["json_out"], options["runs_dir"]
    if resume and config:
        raise UserError("--resume continues a run with its own options; leave out --config")
    tracker = _tracker(options["track"])
    run = (resume_training(resume, runs_dir, log=_log(json_out)) if resume
           else run_training(train_config(options), runs_dir, log=_log(json_out)))
    if tracker is not None:
        tracker.safely(lambda: tracker.log_run(run), what=f"run {run.name} (saved in {run.path})", log=_log(True))
    if json_out:
        _print_json(run.record.to_dict())
        return
    tables.print_record(console, run)


def _tracker(spec: Optional[str]):
    """The --track destination, checked before the command does any work (None without --track)."""
    if not spec:
        return None
    from training.record.tracking import open_tracker  # noqa: PLC0415 (MLflow loads only with --track)

    return open_tracker(spec)


def _with_train_options(*, leave_out: tuple[str, ...]) -> Callable:
    """Give a command every `tlserve train` option after its own (but `leave_out`): one list of options,
    so `tune` takes what `train` takes, a recipe included, and a new training option reaches both."""
    def wrap(command: Callable) -> Callable:
        own = inspect.signature(command, eval_str=True)
        kept = [p for p in own.parameters.values() if p.kind != p.VAR_KEYWORD]
        shared = [p for name, p in inspect.signature(train, eval_str=True).parameters.items()
                  if name not in own.parameters and name not in leave_out]
        command.__signature__ = own.replace(parameters=kept + shared)
        command.__annotations__ = {p.name: p.annotation for p in kept + shared}
        return command

    return wrap


@app.command()
@_with_train_options(leave_out=("name", "overwrite", "resume", "json_out"))
def tune(
    ctx: typer.Context,
    space: Annotated[Optional[str], typer.Option(help="What to search: NAME=LOW..HIGH[:log] or NAME=A|B, comma-separated (e.g. lr=1e-4..1e-2:log,dropout=0..0.5,head=gap|gap-dense); or space: in --config.")] = None,
    trials: Annotated[int, typer.Option(help="Finished trials the study runs to (counting those of earlier or parallel processes).")] = 40,
    study: Annotated[Optional[str], typer.Option(help="Study name; the same name resumes it (default: tune-BACKBONE-STRATEGY-DATA).")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Optuna RDB URL shared by parallel processes (default: sqlite in the study folder).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Study folder: best.yaml, trials.csv, summary.json (default: $TLSERVE_HOME/tune/STUDY or ./tune/STUDY).")] = None,
    timeout: Annotated[Optional[float], typer.Option(help="Stop starting trials after this many seconds.")] = None,
    pruner: Annotated[str, typer.Option(help="median (stop a trial whose val accuracy falls below the median of earlier trials at the same epoch) | none.")] = "median",
    final: Annotated[bool, typer.Option("--final/--no-final", help="After the search, train the best and the default configuration as runs and measure each on the test split once.")] = True,
    **_train_options: Any,
) -> None:
    """Search hyperparameters with Optuna (TPE, median pruning) on the validation split; every `tlserve train` option sets the rest."""
    from training.fit.recipes import merge, train_config  # noqa: PLC0415
    from training.fit.search_space import parse  # noqa: PLC0415
    from training.fit.tune import TuneOptions, tune as run_tune  # noqa: PLC0415

    options = merge(ctx, options_file) if (options_file := ctx.params.get("config")) else dict(ctx.params)
    opts = TuneOptions(space=options["space"], trials=options["trials"], study=options["study"],
                       storage=options["storage"], out=options["out"], timeout=options["timeout"],
                       pruner=options["pruner"], final=options["final"])
    names = parse(opts.space).names
    tracker = _tracker(options["track"])
    result = run_tune(train_config(options), opts, options["runs_dir"], log=_log(soft_wrap=True),
                      on_trial=tables.trial_printer(console, names), tracker=tracker)
    tables.print_tune(console, result)


@app.command()
def summary(
    ctx: typer.Context,
    backbone: Backbone = "cnn",
    strategy: Strategy = "scratch",
    image_size: Annotated[int, typer.Option("--image-size", help="The data's image size.")] = 32,
    num_classes: Annotated[int, typer.Option(help="Classes of the output layer.")] = 10,
    weights: Annotated[str, typer.Option(help="Weights do not change the counts; none avoids a download.")] = "none",
    input_size: InputSize = None,
    head: Head = None,
    head_units: HeadUnits = 256,
    cnn_layers: CnnLayers = "seed003",
    cnn_padding: CnnPadding = None,
    bn_momentum: BnMomentum = 0.99,
    l2: L2 = 0.0,
    truncate_at: TruncateAt = None,
    unfreeze: Unfreeze = None,
    unfreeze_from: UnfreezeFrom = None,
    layers: Annotated[bool, typer.Option("--layers", help="Also list every layer with its trainable flag.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Inspect a backbone + strategy without training: depth, parameters, trainable vs frozen layers."""
    from training.fit.recipes import train_config  # noqa: PLC0415
    from training.fit.summary import describe  # noqa: PLC0415

    result = describe(train_config(ctx.params), image_size=image_size, num_classes=num_classes)
    if json_out:
        _print_json(result)
        return
    tables.print_summary(console, result, image_size, num_classes, layers=layers)


@app.command("backbones")
def list_backbones() -> None:
    """List the backbones `--backbone` accepts, and the CNN presets."""
    tables.print_backbones(console)


@app.command("runs")
def list_runs_cmd(
    runs_dir: RunsDir = None,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Also write seed 001's CSV to this file.")] = None,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Print the command that shows every run's TensorBoard logs side by side.")] = False,
) -> None:
    """List finished runs with seed 001's columns plus epochs_to_target."""
    from serving.base import storage  # noqa: PLC0415
    from training.record.records import list_runs, table_csv  # noqa: PLC0415
    from training.fit.train import interrupted  # noqa: PLC0415

    if tensorboard:
        from training.record.tensorboard_logs import command  # noqa: PLC0415

        line = command([(r.path.name, r.path.resolve()) for r in list_runs(runs_dir)])
        if not line:
            raise UserError(f"no finished run in {storage.runs_dir(runs_dir)} has TensorBoard logs")
        print(line)  # plain stdout, no wrapping: it is meant to be pasted or run with $(...)
        return

    for stale in storage.remove_stale_staging(storage.runs_dir(runs_dir)):
        console.print(f"removed {stale.name}: left by a command that was killed", highlight=False)
    runs, paused = list_runs(runs_dir), interrupted(runs_dir)
    if not runs and not paused:
        raise UserError(f"no finished runs in {storage.runs_dir(runs_dir)}; train one with `tlserve train`")
    if runs:
        tables.print_runs(console, f"runs in {storage.runs_dir(runs_dir)}", [r.record for r in runs])
    tables.print_interrupted(console, paused)
    if csv:
        storage.write_text(csv, table_csv([r.record for r in runs]))
        console.print(f"wrote {csv}")


# ---- exported models: export, predict, eval, models --------------------------


@app.command()
def export(
    run: Annotated[str, typer.Argument(help="A finished run (name under runs/ or a path).")],
    name: Annotated[Optional[str], typer.Option(help="Model name (default: the run's name).")] = None,
    formats: Annotated[str, typer.Option(help="Comma-separated: savedmodel,onnx.")] = "savedmodel,onnx",
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write model.fp16.onnx (float16 inside, float32 in/out; for GPUs).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Also write model.int8.onnx (static QDQ, calibrated on training images; for CPUs).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export of the same name.")] = False,
    register: Annotated[bool, typer.Option("--register/--no-register", help="Also register in the BentoML model store.")] = True,
    max_accuracy_drop: Annotated[float, typer.Option(help="--fp16/--int8: do not keep a variant whose test accuracy is more than this many points below fp32's.")] = 1.0,
    max_class_drop: Annotated[float, typer.Option(help="--fp16/--int8: do not keep a variant that loses more than this many points of recall on any one class.")] = 5.0,
    runs_dir: RunsDir = None,
    models_dir: ModelsDir = None,
    track: Track = None,
) -> None:
    """Export a run to models/<name>/: SavedModel and ONNX, checked against Keras, with a manifest."""
    from training.exported.export import ExportOptions, export as run_export, parse_formats  # noqa: PLC0415

    opts = ExportOptions(name=name, formats=parse_formats(formats), opset=opset, fp16=fp16, int8=int8,
                         overwrite=overwrite, register=register, max_accuracy_drop=max_accuracy_drop,
                         max_class_drop=max_class_drop)
    tracker = _tracker(track)
    path, manifest = run_export(run, opts, runs_dir=runs_dir, models_dir=models_dir, log=_log(soft_wrap=True))
    if tracker is not None:
        tracker.safely(lambda: tracker.log_export(path, manifest), what=f"export {path}", log=_log(True))
    tables.print_export(console, path, manifest)


@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="An exported model: name under models/, a folder, or a BentoML tag.")],
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="How many classes to show per image.")] = 3,
    runtime: Annotated[str, typer.Option(help=f"{choices(BASE_RUNTIMES)} (onnx takes --variant).")] = "onnx",
    variant: Annotated[str, typer.Option(help=f"With --runtime onnx, the ONNX file: {choices(BY_VARIANT)}.")] = "fp32",
    json_out: Annotated[bool, typer.Option("--json", help="One JSON line per image.")] = False,
    models_dir: ModelsDir = None,
) -> None:
    """Classify image files (any mode, EXIF orientation honoured)."""
    from serving.base.manifest import resolve_model  # noqa: PLC0415
    from training.exported.loader import predict_files  # noqa: PLC0415 (onnx, savedmodel, keras)

    results, failures = predict_files(resolve_model(model, models_dir), paths, runtime=runtime, variant=variant, k=top_k)
    if json_out:
        for r in results:
            print(json.dumps({"path": r.path, "top": r.top}))
    elif results:
        tables.print_predictions(console, f"{model} ({runtime})", results)
    tables.print_errors(err, failures)
    if failures:
        raise typer.Exit(2)


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="An exported model: name under models/, a folder, or a BentoML tag.")],
    data: Annotated[str, typer.Option("--data", help="Labelled images: folder:PATH (one folder per class, with or without train/val/test) | cifar10[:PATH] | synthetic.")],
    split: Annotated[str, typer.Option(help="With split sub-folders (or cifar10/synthetic): train | val | test.")] = "test",
    variants: Annotated[str, typer.Option(help=f"ONNX variants: comma-separated {','.join(BY_VARIANT)}, or all the export has.")] = "all",
    runtime: Annotated[str, typer.Option(help=f"{choices(BASE_RUNTIMES)} (only onnx takes --variants).")] = "onnx",
    url: Annotated[Optional[str], typer.Option(help="Evaluate the running service instead (e.g. http://127.0.0.1:3000).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Results folder (default: MODEL/eval/<timestamp>/).")] = None,
    ignore_unknown: Annotated[bool, typer.Option("--ignore-unknown", help="Skip (and count) class folders the model does not know.")] = False,
    seed: Annotated[int, typer.Option(help="synthetic: the training seed whose split to use.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per onnxruntime call.")] = 64,
    gradcam: Annotated[bool, typer.Option("--gradcam/--no-gradcam", help="Show each listed mistake's Grad-CAM (uses the run's Keras model).")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print metrics.json.")] = False,
    models_dir: ModelsDir = None,
    runs_dir: RunsDir = None,
    track: Track = None,
) -> None:
    """Accuracy, per-class precision/recall/F1, calibration and abstention of an exported model on labelled images."""
    from serving.base.manifest import Manifest, resolve_model  # noqa: PLC0415
    from training.exported.evaluation import EvalOptions, evaluate  # noqa: PLC0415

    opts = EvalOptions(data=data, split=split, variants=variants, runtime=runtime, url=url, out=out,
                       ignore_unknown=ignore_unknown, seed=seed, batch_size=batch_size, gradcam=gradcam,
                       runs_dir=runs_dir)
    model_dir = resolve_model(model, models_dir)
    tracker = _tracker(track)
    result = evaluate(model_dir, opts, log=_log(stderr=True))
    if tracker is not None:
        tracker.safely(lambda: tracker.log_eval(result, Manifest.load(model_dir)), what=f"eval {result.get('path')}",
                       log=_log(stderr=True))
    if json_out:
        _print_json(result)
        return
    tables.print_eval(console, result)


@app.command("models")
def list_models_cmd(
    models_dir: ModelsDir = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List exported models (models/ and the BentoML model store)."""
    from serving import catalog  # noqa: PLC0415

    for stale in catalog.remove_stale(models_dir):
        err.print(f"removed {stale.name}: left by an export that was killed", highlight=False, soft_wrap=True)
    rows = catalog.list_models(models_dir)
    if json_out:
        _print_json(rows)
        return
    if not rows:
        raise UserError("no exported models; export a run with `tlserve export RUN`")
    tables.print_models(console, rows)


# ---- serve / build -----------------------------------------------------------


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="An exported model: name under models/, a folder, or a BentoML tag.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 3000,
    workers: Annotated[int, typer.Option(help="BentoML worker processes.")] = 1,
    models_dir: ModelsDir = None,
) -> None:
    """Serve a model over HTTP with BentoML (POST /predict, /predict_batch; GET /metadata)."""
    from serving.bento import exec_serve  # noqa: PLC0415

    def ready(model_dir: Path, url: str) -> None:
        console.print(f"serving {model_dir} at {url}  (Ctrl-C to stop)", highlight=False)
        console.print(f"try: curl -F image=@some.png {url}/predict", highlight=False)

    exec_serve(model, models_dir, host, port, workers, ready)


@app.command()
def build(
    model: Annotated[str, typer.Argument(help="An exported model: name under models/, a folder, or a BentoML tag.")],
    models_dir: ModelsDir = None,
) -> None:
    """Build a bento (service + model + pinned requirements + Dockerfile) with `bentoml build`."""
    from serving.bento import build as build_bento  # noqa: PLC0415

    tag, _ = build_bento(model, models_dir)
    console.print(f"built bento {tag}", highlight=False)
    console.print(f"container image: bentoml containerize {tag}", highlight=False)
    console.print(f"run it:          docker run --rm -p 3000:3000 {tag}   (add --gpus all on a GPU host)",
                  highlight=False)


# ---- measuring and looking inside: bench, compare, features, explain ----------


@app.command()
def bench(
    model: Annotated[Optional[str], typer.Argument(help="An exported model (name, folder or BentoML tag). With --url: optional, adds the in-process floor and stores the result.")] = None,
    runtimes: Annotated[str, typer.Option(help=f"{', '.join(BENCH_RUNTIMES)} (missing variants are skipped).")] = "keras,savedmodel,onnx,onnx-int8,onnx-fp16",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32",
    duration: Annotated[float, typer.Option(help="Seconds per runtime and batch size.")] = 3.0,
    iterations: Annotated[Optional[int], typer.Option(help="A fixed number of timed calls instead of --duration.")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed calls first.")] = 5,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime intra-op threads (default: physical cores).")] = None,
    url: Annotated[Optional[str], typer.Option(help="Benchmark a running service end to end instead (e.g. http://127.0.0.1:3000).")] = None,
    concurrency: Annotated[str, typer.Option(help="With --url: comma-separated client counts.")] = "1,8,32",
    requests: Annotated[int, typer.Option(help="With --url: requests per concurrency level.")] = 200,
    images: Annotated[Optional[Path], typer.Option(help="With --url: upload images from this folder (default: generated).")] = None,
    allow_remote: Annotated[bool, typer.Option(help="With --url: allow a non-loopback address.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the stored result as JSON.")] = False,
    models_dir: ModelsDir = None,
) -> None:
    """Latency (p50/p90/p99/max) and throughput, in-process per runtime or over HTTP; stored in models/<name>/bench/."""
    from training.exported.bench import BenchOptions, bench as run_bench  # noqa: PLC0415

    opts = BenchOptions(runtimes=runtimes, batch_sizes=batch_sizes, duration=duration, iterations=iterations,
                        warmup=warmup, threads=threads, url=url, concurrency=concurrency, requests=requests,
                        images=images, allow_remote=allow_remote)
    report = run_bench(model, opts, models_dir=models_dir, log=_log(json_out))
    if json_out:
        _print_json(report)
    elif "path" in report:
        console.print(f"stored {report['path']}", highlight=False)


@app.command()
def compare(
    runs: Annotated[Optional[list[str]], typer.Argument(help="Runs to compare (default: every finished run).")] = None,
    out: Annotated[Path, typer.Option(help="Report folder (report.md, report.html, PNGs).")] = Path("report"),
    runs_dir: RunsDir = None,
    models_dir: ModelsDir = None,
) -> None:
    """One report: training table, frozen vs fine-tuned, size and latency beside accuracy, plots, answers."""
    from training.exported.report import answers, build as build_report  # noqa: PLC0415

    folder, entries = build_report(runs or [], out, runs_dir=runs_dir, models_dir=models_dir)
    tables.print_runs(console, "runs", [e.record for e in entries])
    for line in answers(entries):
        console.print(f"- {line}", highlight=False)
    console.print(f"report: {folder / 'report.html'} and {folder / 'report.md'}", highlight=False)


@app.command()
def features(
    run: Annotated[str, typer.Argument(help="A finished run.")],
    image: Annotated[Path, typer.Argument(help="An image file.")],
    layer: Annotated[str, typer.Option(help="Layer name (nested backbone layers too, e.g. block_13_expand_relu).")],
    out: Annotated[Optional[Path], typer.Option(help="PNG to write (default: RUN-LAYER.png).")] = None,
    max_maps: Annotated[int, typer.Option(help="At most this many channels.")] = 32,
    runs_dir: RunsDir = None,
) -> None:
    """Save a grid of one layer's feature maps for an image (seed 003, step 4)."""
    from training.exported.features import feature_maps  # noqa: PLC0415

    path = feature_maps(run, image, layer, out, max_maps=max_maps, runs_dir=runs_dir)
    console.print(f"wrote {path}", highlight=False)


@app.command()
def explain(
    run_or_model: Annotated[str, typer.Argument(help="A finished run (name or folder) or an exported model (its run's Keras model is used).")],
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    layer: Annotated[Optional[str], typer.Option(help="Layer to explain (default: the last convolution with a map larger than 1x1).")] = None,
    class_name: Annotated[Optional[str], typer.Option("--class", help="Explain this class instead of the predicted one.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the <stem>-gradcam.png files.")] = Path("explain"),
    runs_dir: RunsDir = None,
    models_dir: ModelsDir = None,
) -> None:
    """Grad-CAM: write each image with a heat map of the pixels behind the prediction (or --class)."""
    from training.exported.explain import explain_files  # noqa: PLC0415

    _, failures = explain_files(run_or_model, paths, out=out, layer=layer, class_name=class_name, runs_dir=runs_dir,
                                models_dir=models_dir, log=_log(soft_wrap=True))
    tables.print_errors(err, failures)
    if failures:
        raise typer.Exit(2)


# ---- data ------------------------------------------------------------------------------------

data_app = typer.Typer(help="Look at a data source before trusting a number trained on it.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    data: Data = "synthetic",
    out: Annotated[Optional[Path], typer.Option(help="Folder for report.json and index.html (default: data-check/<UTC time>/ under $TLSERVE_HOME or .).")] = None,
    mode: Annotated[str, typer.Option(help="full: hashes and MobileNetV2 embeddings | fast: hashes only (what training runs).")] = "full",
    weights: Annotated[str, typer.Option(help="Embedding weights: imagenet (Keras download) | PATH.h5 (MobileNetV2, no top).")] = "imagenet",
    phash_distance: Annotated[int, typer.Option(help="Near duplicate: perceptual hashes at most this many bits apart (of 64; 0-32).")] = 4,
    pixel_correlation: Annotated[float, typer.Option(help="...and their 32x32 grey images correlate at least this (0-1).")] = 0.9,
    cosine: Annotated[float, typer.Option(help="Near duplicate (full mode): embedding cosine at least this (0.5-1).")] = 0.9,
    classes: Classes = None,
    val_split: Annotated[float, typer.Option(help="As in `tlserve train`: the check splits the data as training does.")] = 0.1,
    seed: Annotated[int, typer.Option(help="As in `tlserve train`: the split seed.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print report.json to stdout.")] = False,
    search: Annotated[str, typer.Option(help="Embedding pair search: auto (a faiss index past 200,000 images) | exact | ann (needs the [ann] extra).")] = "auto",
) -> None:
    """Duplicates and leaks across splits, label conflicts, class balance, sizes/modes, unreadable files."""
    from training.config import DataConfig  # noqa: PLC0415
    from training.audit.datacheck import Thresholds, check  # noqa: PLC0415
    from training.audit.page import default_out, write  # noqa: PLC0415

    thresholds = Thresholds(phash=phash_distance, cosine=cosine, pixels=pixel_correlation).validate()
    cfg = DataConfig(spec=data, classes=classes, val_split=val_split, seed=seed)
    report = check(cfg, mode=mode, thresholds=thresholds, weights=weights, log=_log(json_out), search=search)
    folder = write(report, out or default_out())
    if json_out:
        _print_json(report.data)
        return
    tables.print_data_check(console, report.data, folder)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: a user's mistake is one line and exit 2, never a traceback."""
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:  # a typer.Exit(code) comes back as a return value here
            raise SystemExit(code)
    except UserError as exc:
        _report(str(exc))
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        err.print("aborted")
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise SystemExit(130) from None
    except OSError as exc:  # a path the user gave that cannot be read or written, a full disk
        if not exc.filename:
            raise
        _report(f"{exc.strerror}: {exc.filename}")
        raise SystemExit(2) from None
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click  # noqa: PLC0415

        # typer 0.2x raises its own vendored copy of click's errors (typer._click), under TyperException
        if isinstance(exc, (click.ClickException, getattr(typer, "TyperException", click.ClickException))):
            exc.show()
            raise SystemExit(2) from None
        raise


def _report(message: str) -> int:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return 2


if __name__ == "__main__":
    main()
