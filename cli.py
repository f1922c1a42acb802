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
from rich.markup import escape

from serving.base.errors import UserError, choose
from serving.containers import ENGINE_CHOICES, IMAGE_KINDS
from serving.base.formats import BASE_RUNTIMES, BENCH_RUNTIMES, BY_VARIANT, choices
from training.config import DataConfig, TrainConfig
from training.console import tables
from training.exported.int8 import Budget
from training.exported.options import BenchOptions, EvalOptions, ExportOptions  # every default below comes from these

app = typer.Typer(
    name="tlserve",
    help="Train, compare, export, serve and benchmark transfer-learning image classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # click's own help layout, not rich's panels: at 80 columns rich's option table (long flags, their
    # --no- forms and types in columns of their own) left descriptions 23 columns; click's leaves 46.
    # Help text is also printed as written, so "[ann]" is not taken for markup.
    rich_markup_mode=None,
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


# Long only by its signature: one line per `tlserve train` option (typer reads them there); the body is 12 lines.
@app.command()
def train(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option("--config", help="A recipe (YAML or JSON; any option below as a key) or a run's record.json; options given here override it.")] = None,
    data: Data = DataConfig.spec,
    backbone: Backbone = TrainConfig.backbone,
    strategy: Strategy = TrainConfig.strategy,
    weights: Weights = TrainConfig.weights,
    classes: Classes = DataConfig.classes,
    val_split: Annotated[float, typer.Option(help="Fraction of train held out for validation when the data has no val split.")] = DataConfig.val_split,
    limit: Annotated[Optional[int], typer.Option(help="At most N images per split (quick runs).")] = DataConfig.limit,
    image_size: ImageSize = DataConfig.image_size,
    input_size: InputSize = TrainConfig.input_size,
    head: Head = TrainConfig.head,
    head_units: HeadUnits = TrainConfig.head_units,
    dropout: Annotated[float, typer.Option(help="Head dropout rate.")] = TrainConfig.dropout,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random augmentation layers, active in training only.")] = TrainConfig.augment,
    augment_policy: Annotated[str, typer.Option(help="With --augment or --augment-views: seed (random flip, rotation and zoom) | flip-crop (flip and 1/8-side shifts, a fast CIFAR-10 recipe). With --augment-views only: crop (inception crop: 35-100 percent of the area, aspect 3/4-4/3) | mixup (seed's view mixed with another training image, lam ~ Beta(1, 1), labels mixed alike) | crop-mixup (crop, then mixup).")] = TrainConfig.augment_policy,
    augment_views: Annotated[int, typer.Option(help="Train on K augmented views of each image, drawn once by --augment-policy and --seed (one per image each epoch); with --teacher, the teacher's probabilities on each view. 0 = off.")] = TrainConfig.augment_views,
    cnn_layers: CnnLayers = TrainConfig.cnn_layers,
    cnn_padding: CnnPadding = TrainConfig.cnn_padding,
    bn_momentum: BnMomentum = TrainConfig.bn_momentum,
    l2: L2 = TrainConfig.l2,
    truncate_at: TruncateAt = TrainConfig.truncate_at,
    unfreeze: Unfreeze = TrainConfig.unfreeze,
    unfreeze_from: UnfreezeFrom = TrainConfig.unfreeze_from,
    from_run: Annotated[Optional[str], typer.Option(help="Start from one of your finished runs: its layers, with a new output layer.")] = TrainConfig.from_run,
    train_last: Annotated[int, typer.Option(help="With --from-run: train only the last K layers that have weights.")] = TrainConfig.train_last,
    epochs: Annotated[int, typer.Option("--epochs", "-e", help="Epochs (finetune: phase 1).")] = TrainConfig.epochs,
    finetune_epochs: Annotated[int, typer.Option(help="finetune: phase 2 epochs.")] = TrainConfig.finetune_epochs,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = TrainConfig.lr,
    finetune_lr: Annotated[float, typer.Option(help="finetune: phase 2 learning rate.")] = TrainConfig.finetune_lr,
    optimizer: Annotated[str, typer.Option(help="adam | sgd | rmsprop.")] = TrainConfig.optimizer,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = TrainConfig.momentum,
    nesterov: Annotated[bool, typer.Option("--nesterov/--no-nesterov", help="SGD with Nesterov momentum.")] = TrainConfig.nesterov,
    weight_decay: Annotated[float, typer.Option(help="Decoupled weight decay on kernels: each step shrinks them by lr x this (0 = off).")] = TrainConfig.weight_decay,
    schedule: Annotated[str, typer.Option(help="Learning rate: constant | onecycle (warm-up to --lr, cosine to 0) | cosine.")] = TrainConfig.schedule,
    label_smoothing: Annotated[float, typer.Option(help="Spread this share of each target over all classes (0 = off).")] = TrainConfig.label_smoothing,
    logit_scale: Annotated[float, typer.Option(help="Scratch CNNs: multiply the logits before softmax (ResNet-9 recipe: 0.125).")] = TrainConfig.logit_scale,
    tta: Annotated[str, typer.Option(help="none | flip: the saved model averages its logits over each image and its mirror (twice the inference work).")] = TrainConfig.tta,
    class_weight: Annotated[str, typer.Option(help="Loss weight per class: none | balanced (n / (classes x count)) | name=weight,... (others 1).")] = TrainConfig.class_weight,
    calibrate: Annotated[bool, typer.Option("--calibrate/--no-calibrate", help="Fit a temperature on the validation split and bake it into the saved model (calibrated probabilities, same top class).")] = TrainConfig.calibrate,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = TrainConfig.batch_size,
    target: Annotated[float, typer.Option(help="Record the first epoch whose val accuracy reaches this.")] = TrainConfig.target,
    patience: Annotated[Optional[int], typer.Option(help="Early stopping patience on val_loss (best weights restored); 0 = off.")] = TrainConfig.patience,
    seed: Annotated[int, typer.Option(help="Seed for data splits (unless --split-seed), shuffles, views and initial weights.")] = TrainConfig.seed,
    split_seed: Annotated[Optional[int], typer.Option(help="Seed that draws the train/val/test split alone (default: --seed): compare training methods on one split.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Run name (default: backbone-strategy-data-time).")] = TrainConfig.name,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run of the same name.")] = TrainConfig.overwrite,
    feature_cache: Annotated[bool, typer.Option("--feature-cache/--no-feature-cache", help="Frozen backbone without augmentation: compute its features once and train the head on them.")] = TrainConfig.feature_cache,
    precision: Annotated[str, typer.Option(help="auto (mixed_float16 on a GPU, float32 on CPU) | float32 | mixed_float16.")] = TrainConfig.precision,
    jit: Annotated[Optional[bool], typer.Option("--jit/--no-jit", help="XLA compilation (default: on for GPUs, never on CPU).")] = TrainConfig.jit,
    distribute: Annotated[str, typer.Option(help="auto (MirroredStrategy over >1 GPU; TF_CONFIG: multi-worker) | none | mirrored.")] = TrainConfig.distribute,
    data_check: Annotated[str, typer.Option(help="Check the splits for cross-split copies first: off | fast (hashes) | full (+ MobileNetV2 embeddings).")] = TrainConfig.data_check,
    drop_leaks: Annotated[bool, typer.Option("--drop-leaks", help="Drop training images that duplicate a val or test image (recorded in the run).")] = TrainConfig.drop_leaks,
    exclude: Annotated[Optional[str], typer.Option(help="A file of image paths, one a line (e.g. `tlserve data check --suspects`): drop those training images (recorded in the run).")] = TrainConfig.exclude,
    teacher: Annotated[Optional[str], typer.Option(help="Distil: learn from this run's probabilities as well as the labels (a run on the same data, classes and split).")] = TrainConfig.teacher,
    distill_temperature: Annotated[float, typer.Option(help="With --teacher: soften both models' probabilities by this temperature.")] = TrainConfig.distill_temperature,
    distill_weight: Annotated[float, typer.Option(help="With --teacher: the share of the loss that matches the teacher (the rest: the labels).")] = TrainConfig.distill_weight,
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
    backbone: Backbone = TrainConfig.backbone,
    strategy: Strategy = TrainConfig.strategy,
    image_size: Annotated[int, typer.Option("--image-size", help="The data's image size.")] = 32,
    num_classes: Annotated[int, typer.Option(help="Classes of the output layer.")] = 10,
    weights: Annotated[str, typer.Option(help="Weights do not change the counts; none avoids a download.")] = "none",
    input_size: InputSize = TrainConfig.input_size,
    head: Head = TrainConfig.head,
    head_units: HeadUnits = TrainConfig.head_units,
    cnn_layers: CnnLayers = TrainConfig.cnn_layers,
    cnn_padding: CnnPadding = TrainConfig.cnn_padding,
    bn_momentum: BnMomentum = TrainConfig.bn_momentum,
    l2: L2 = TrainConfig.l2,
    truncate_at: TruncateAt = TrainConfig.truncate_at,
    unfreeze: Unfreeze = TrainConfig.unfreeze,
    unfreeze_from: UnfreezeFrom = TrainConfig.unfreeze_from,
    layers: Annotated[bool, typer.Option("--layers", help="Also list every layer with its trainable flag.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Inspect a model without training it. Depth, parameters, trainable and frozen layers of a backbone and strategy."""
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
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Also write the table, every column, as CSV to this file.")] = None,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Print the command that shows every run's TensorBoard logs side by side.")] = False,
) -> None:
    """List finished runs. Epochs, time, test accuracy, parameters, epochs to target and macro F1 of each."""
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
    name: Annotated[Optional[str], typer.Option(help="Model name (default: the run's name).")] = ExportOptions.name,
    formats: Annotated[str, typer.Option(help="Comma-separated: savedmodel,onnx.")] = ",".join(ExportOptions.formats),
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = ExportOptions.opset,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write model.fp16.onnx (float16 inside, float32 in/out; for GPUs).")] = ExportOptions.fp16,
    int8: Annotated[bool, typer.Option("--int8", help="Also write model.int8.onnx (static QDQ, calibrated on training images; for CPUs).")] = ExportOptions.int8,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export of the same name.")] = ExportOptions.overwrite,
    register: Annotated[bool, typer.Option("--register/--no-register", help="Also register in the BentoML model store.")] = ExportOptions.register,
    max_accuracy_drop: Annotated[float, typer.Option(help="--fp16/--int8: do not keep a variant whose test accuracy is more than this many points below fp32's.")] = ExportOptions.max_accuracy_drop,
    max_class_drop: Annotated[float, typer.Option(help="--fp16/--int8: do not keep a variant that loses more than this many points of recall on any one class.")] = ExportOptions.max_class_drop,
    int8_tries: Annotated[int, typer.Option(help="--int8: when the gate refuses the file, quantize again keeping more of the first convolutions float, at most this many tries in all (1: no fallback).")] = Budget.tries,
    int8_seconds: Annotated[float, typer.Option(help="--int8: stop the fallback's tries after this many seconds.")] = Budget.seconds,
    ood: Annotated[bool, typer.Option("--ood/--no-ood", help="Give every file an out-of-distribution score as its second output (Mahalanobis distance of the penultimate features to the training classes).")] = ExportOptions.ood,
    ood_accept: Annotated[float, typer.Option(help="The OOD threshold accepts this share of the validation split (between 0 and 1).")] = ExportOptions.ood_accept,
    ood_images: Annotated[int, typer.Option(help="Fit the OOD reference on at most this many training images (stratified).")] = ExportOptions.ood_images,
    runs_dir: RunsDir = None,
    models_dir: ModelsDir = None,
    track: Track = None,
) -> None:
    """Export a run to models/<name>/: SavedModel and ONNX, checked against Keras, with a manifest."""
    from training.exported.export import export as run_export, parse_formats  # noqa: PLC0415

    opts = ExportOptions(name=name, formats=parse_formats(formats), opset=opset, fp16=fp16, int8=int8,
                         overwrite=overwrite, register=register, max_accuracy_drop=max_accuracy_drop,
                         max_class_drop=max_class_drop, int8_budget=Budget(int8_tries, int8_seconds),
                         ood=ood, ood_accept=ood_accept, ood_images=ood_images)
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
            print(json.dumps(r.to_dict()))
    elif results:
        tables.print_predictions(console, f"{model} ({runtime})", results)
    tables.print_errors(err, failures)
    if failures:
        raise typer.Exit(2)


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="An exported model: name under models/, a folder, or a BentoML tag.")],
    data: Annotated[str, typer.Option("--data", help="Labelled images: folder:PATH (one folder per class, with or without train/val/test) | cifar10[:PATH] | synthetic.")],
    split: Annotated[str, typer.Option(help="With split sub-folders (or cifar10/synthetic): train | val | test.")] = EvalOptions.split,
    variants: Annotated[str, typer.Option(help=f"ONNX variants: comma-separated {','.join(BY_VARIANT)}, or all the export has.")] = EvalOptions.variants,
    runtime: Annotated[str, typer.Option(help=f"{choices(BASE_RUNTIMES)} (only onnx takes --variants).")] = EvalOptions.runtime,
    url: Annotated[Optional[str], typer.Option(help="Evaluate the running service instead (e.g. http://127.0.0.1:3000).")] = EvalOptions.url,
    out: Annotated[Optional[Path], typer.Option(help="Results folder (default: MODEL/eval/<timestamp>/).")] = EvalOptions.out,
    ignore_unknown: Annotated[bool, typer.Option("--ignore-unknown", help="Skip (and count) class folders the model does not know.")] = EvalOptions.ignore_unknown,
    seed: Annotated[int, typer.Option(help="synthetic: the training seed whose split to use.")] = EvalOptions.seed,
    batch_size: Annotated[int, typer.Option(help="Images per onnxruntime call.")] = EvalOptions.batch_size,
    gradcam: Annotated[bool, typer.Option("--gradcam/--no-gradcam", help="Show each listed mistake's Grad-CAM (uses the run's Keras model).")] = EvalOptions.gradcam,
    ood: Annotated[Optional[Path], typer.Option("--ood", help="A folder of out-of-distribution images: report the OOD score's AUROC (and the max-softmax baseline's) against --data's images.")] = EvalOptions.ood,
    json_out: Annotated[bool, typer.Option("--json", help="Print metrics.json.")] = False,
    models_dir: ModelsDir = None,
    runs_dir: RunsDir = None,
    track: Track = None,
) -> None:
    """Evaluate an exported model on labelled images. Accuracy, per-class precision/recall/F1, calibration and abstention."""
    from serving.base.manifest import Manifest, resolve_model  # noqa: PLC0415
    from training.exported.evaluation import evaluate  # noqa: PLC0415

    opts = EvalOptions(data=data, split=split, variants=variants, runtime=runtime, url=url, out=out,
                       ignore_unknown=ignore_unknown, seed=seed, batch_size=batch_size, gradcam=gradcam,
                       runs_dir=runs_dir, ood=ood)
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
    """Serve a model over HTTP with BentoML. POST /predict and /predict_batch; GET /metadata."""
    from serving.bento import exec_serve  # noqa: PLC0415

    def ready(model_dir: Path, url: str) -> None:
        console.print(f"serving {model_dir} at {url}  (Ctrl-C to stop)", highlight=False)
        console.print(f"try: curl -F image=@some.png {url}/predict", highlight=False)

    exec_serve(model, models_dir, host, port, workers, ready)


@app.command()
def build(
    model: Annotated[str, typer.Argument(help="An exported model: name under models/, a folder, or a BentoML tag.")],
    device: Annotated[str, typer.Option(help=escape(f"{' | '.join(IMAGE_KINDS)}: the image's onnxruntime ({', '.join(f'{k}: {v.runtime}' for k, v in IMAGE_KINDS.items())})."))] = "cpu",
    image: Annotated[bool, typer.Option(help="Also build the container image (--no-image: the bento alone).")] = True,
    engine: Annotated[str, typer.Option(help=f"{' | '.join(ENGINE_CHOICES)} (auto: the first that answers).")] = "auto",
    base_image: Annotated[Optional[str], typer.Option(help="The image to build on (default: the one serving/service.py names; any with Python 3.11 and pip).")] = None,
    network: Annotated[Optional[str], typer.Option(help="Network for the build's RUN steps, e.g. host where the engine has no bridge.")] = None,
    models_dir: ModelsDir = None,
) -> None:
    """Build a bento (service + model + pinned requirements) and its container image for a device kind."""
    from serving.bento import bentoml_exe, build as build_bento  # noqa: PLC0415
    from serving.containers import build_image, find_engine  # noqa: PLC0415

    choose("--device", device, list(IMAGE_KINDS))
    builder = find_engine(engine) if image else None  # before the bento: no engine is one line, nothing built
    tag, _ = build_bento(model, models_dir, kind=device, base_image=base_image)
    console.print(f"built bento {tag} ({device}: {IMAGE_KINDS[device].runtime})", highlight=False, markup=False)
    if builder is None:
        console.print(f"its image: tlserve build {model} --device {device}  (or bentoml containerize {tag})",
                      highlight=False, soft_wrap=True)
        return
    built = build_image(bentoml_exe(), tag, builder, IMAGE_KINDS[device].run_flags, network)
    console.print(f"built image {built.tag} with {built.engine}: {built.size_bytes / 1e6:.0f} MB", highlight=False)
    console.print(f"run it: {built.run_command}", highlight=False, soft_wrap=True)


# ---- measuring and looking inside: bench, compare, features, explain ----------


@app.command()
def bench(
    model: Annotated[Optional[str], typer.Argument(help="An exported model (name, folder or BentoML tag). With --url: optional, adds the in-process floor and stores the result.")] = None,
    runtimes: Annotated[str, typer.Option(help=f"{', '.join(BENCH_RUNTIMES)} (missing variants are skipped).")] = BenchOptions.runtimes,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = BenchOptions.batch_sizes,
    duration: Annotated[float, typer.Option(help="Seconds per runtime and batch size.")] = BenchOptions.duration,
    iterations: Annotated[Optional[int], typer.Option(help="A fixed number of timed calls instead of --duration.")] = BenchOptions.iterations,
    warmup: Annotated[int, typer.Option(help="Untimed calls first.")] = BenchOptions.warmup,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime intra-op threads (default: physical cores).")] = BenchOptions.threads,
    url: Annotated[Optional[str], typer.Option(help="Benchmark a running service end to end instead (e.g. http://127.0.0.1:3000).")] = BenchOptions.url,
    concurrency: Annotated[str, typer.Option(help="With --url: comma-separated client counts.")] = BenchOptions.concurrency,
    requests: Annotated[int, typer.Option(help="With --url: requests per concurrency level.")] = BenchOptions.requests,
    images: Annotated[Optional[Path], typer.Option(help="With --url: upload images from this folder (default: generated).")] = BenchOptions.images,
    allow_remote: Annotated[bool, typer.Option(help="With --url: allow a non-loopback address.")] = BenchOptions.allow_remote,
    json_out: Annotated[bool, typer.Option("--json", help="Print the stored result as JSON.")] = False,
    models_dir: ModelsDir = None,
) -> None:
    """Latency (p50/p90/p99/max) and throughput, in-process per runtime or over HTTP; stored in models/<name>/bench/."""
    from training.exported.bench import bench as run_bench  # noqa: PLC0415

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
    """Compare runs in one report. Training table, frozen vs fine-tuned, size and latency beside accuracy, plots, answers."""
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
    """Save a grid of one layer's feature maps for an image."""
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
    """Show what a prediction looked at (Grad-CAM). Each image is written with a heat map of the pixels behind its prediction (or --class)."""
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
    data: Data = DataConfig.spec,
    out: Annotated[Optional[Path], typer.Option(help="Folder for report.json and index.html (default: data-check/<UTC time>/ under $TLSERVE_HOME or .).")] = None,
    mode: Annotated[str, typer.Option(help="full: hashes and MobileNetV2 embeddings | fast: hashes only (what training runs).")] = "full",
    weights: Annotated[str, typer.Option(help="Embedding weights: imagenet (Keras download) | PATH.h5 (MobileNetV2, no top).")] = "imagenet",
    phash_distance: Annotated[int, typer.Option(help="Near duplicate: perceptual hashes at most this many bits apart (of 64; 0-32).")] = 4,
    pixel_correlation: Annotated[float, typer.Option(help="...and their 32x32 grey images correlate at least this (0-1).")] = 0.9,
    cosine: Annotated[float, typer.Option(help="Near duplicate (full mode): embedding cosine at least this (0.5-1).")] = 0.9,
    classes: Classes = DataConfig.classes,
    val_split: Annotated[float, typer.Option(help="As in `tlserve train`: the check splits the data as training does.")] = DataConfig.val_split,
    seed: Annotated[int, typer.Option(help="As in `tlserve train`: the split seed.")] = DataConfig.seed,
    json_out: Annotated[bool, typer.Option("--json", help="Print report.json to stdout.")] = False,
    search: Annotated[str, typer.Option(help="Embedding pair search: auto (a faiss index past 200,000 images) | exact | ann (needs the [ann] extra: pip install 'tlserve[ann]').")] = "auto",
    labels: Annotated[bool, typer.Option("--labels/--no-labels", help="Full mode: look for mislabelled images (k-fold classifier on the embeddings + cleanlab; the [labels] extra).")] = True,
    suspects: Annotated[Optional[Path], typer.Option(help="Also write the label suspects' paths to this file, one a line (for `tlserve train --exclude`).")] = None,
    crops: Annotated[bool, typer.Option("--crops/--no-crops", help="Full mode: also look for crops and small rotations (aligned grey thumbnails; finds look-alike photos too: docs/decisions.md).")] = False,
) -> None:
    """Duplicates and leaks across splits, label conflicts, label issues, class balance, sizes/modes, unreadable files."""
    from training.audit.datacheck import check  # noqa: PLC0415
    from training.audit.page import default_out, write  # noqa: PLC0415
    from training.audit.pairs import Thresholds  # noqa: PLC0415

    thresholds = Thresholds(phash=phash_distance, cosine=cosine, pixels=pixel_correlation).validate()
    if suspects is not None and (mode != "full" or not labels):
        raise UserError("--suspects needs the label search: --mode full with --labels")
    cfg = DataConfig(spec=data, classes=classes, val_split=val_split, seed=seed)
    report = check(cfg, mode=mode, thresholds=thresholds, weights=weights, log=_log(json_out), search=search,
                   labels=labels, crops=crops)
    folder = write(report, out or default_out(), suspects=suspects)
    if json_out:
        _print_json(report.data)
        return
    tables.print_data_check(console, report.facts, folder, suspects)


@data_app.command("sample")
def data_sample(
    data: Data = "synthetic",
    out: Annotated[Path, typer.Option(help="Folder to write: one sub-folder per class.")] = Path("examples"),
    split: Annotated[str, typer.Option(help="train | val | test, split as `tlserve train` splits it.")] = "test",
    per_class: Annotated[int, typer.Option(help="Images of each class.")] = 1,
    classes: Classes = None,
    val_split: Annotated[float, typer.Option(help="As in `tlserve train`.")] = 0.1,
    seed: Annotated[int, typer.Option(help="As in `tlserve train`: the split seed, and which images.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
) -> None:
    """A few images of every class, as files: to send to a service, evaluate, or look at."""
    from training.config import DataConfig  # noqa: PLC0415
    from training.data.sample import SPLITS, sample  # noqa: PLC0415

    choose("--split", split, SPLITS)
    paths = sample(DataConfig(spec=data, classes=classes, val_split=val_split, seed=seed), out, split=split,
                   per_class=per_class, overwrite=overwrite)
    console.print(f"wrote {len(paths)} images to {out}/ (one folder per class)", highlight=False, soft_wrap=True)


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
