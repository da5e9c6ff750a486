"""`moe-export zoo build NAME -o DIR` and `moe-export zoo list`."""

from __future__ import annotations

import click


@click.group(name="zoo", help="Build and train the small MoE models of the built-in zoo.")
def command():
    pass


@command.command(name="list", help="List the zoo entries and whether each is built in the cache.")
def list_entries():
    from moe_export.zoo.registry import ENTRIES
    from moe_export.zoo.train import default_dir

    rows = []
    for e in ENTRIES.values():
        m = e.model
        built = (default_dir(e.name, 0) / "manifest.json").exists()
        rows.append((e.name, e.arch, f"{m['layers']}", f"{m['experts']}", f"{e.pretrain.corpus} -> {e.finetune.corpus}",
                     "yes" if built else "no", e.description))
    head = ("name", "arch", "layers", "experts", "pre-train -> fine-tune", "built(s0)", "description")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head) - 1)]
    for r in [head] + rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


@command.command(name="build", help="Train zoo entry NAME (pre-train + fine-tune) into DIR; reuses a matching build.")
@click.argument("name")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: $MOE_EXPORT_HOME/zoo/NAME-sSEED].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for init and data order.")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads (1 is fastest on small CPUs).")
@click.option("--force", is_flag=True, help="Rebuild even if a matching build exists.")
def build_cmd(name, out_dir, seed, threads, force):
    import json

    from moe_export.zoo.registry import ENTRIES
    from moe_export.zoo.train import build

    if name not in ENTRIES:
        raise click.BadParameter(f"unknown zoo entry {name!r}; choose one of: {', '.join(ENTRIES)}", param_hint="NAME")
    out = build(name, out_dir, seed, force=force, threads=threads)
    man = json.loads((out / "manifest.json").read_text())
    click.echo(f"{name}: {man['parameters']:,} parameters, built in {man['build_wall_s']} s -> {out}")
    for which, ev in man["eval"].items():
        for corpus, r in ev["results"].items():
            click.echo(f"  {which:10s} {corpus:14s} bpb {r['bpb']['bits_per_byte']:.3f}  cloze acc {r['cloze']['accuracy']:.2f}")
    for corpus, b in man["baselines"].items():
        click.echo(f"  {'bigram':10s} {corpus:14s} bpb {b['token_bigram']['bits_per_byte']:.3f}")
    for line in bigram_note(man):
        click.echo(line)


def bigram_note(man: dict) -> list[str]:
    """Why a model of the table scores worse than the token bigram beside it, when one does."""
    bigram = {c: b["token_bigram"]["bits_per_byte"] for c, b in man["baselines"].items()}
    worse = [(which, c) for which, ev in man["eval"].items() for c, r in ev["results"].items()
             if c in bigram and r["bpb"]["bits_per_byte"] > bigram[c]]
    if not worse:
        return []
    entry, stages = man["entry"], man["stages"]
    pre, ft = entry["pretrain"]["corpus"], entry["finetune"]["corpus"]
    lines = [
        "  note: the token bigram (pair counts over each corpus' whole training split) beats "
        + ", ".join(f"{w} on {c}" for w, c in worse) + ".",
        f"  {man['name']} has {man['parameters']:,} parameters trained on {stages['pretrain']['tokens']:,} {pre} tokens, "
        f"then {stages['finetune']['tokens']:,} {ft} tokens: it is sized to build in minutes for the tests and the demo, "
        "not for quality.",
    ]
    if ("finetuned", pre) in worse:
        lines.append(f"  Fine-tuning on {ft} also moves it away from {pre}, as fine-tuning does.")
    lines.append("  Plan, quantize and export work the same on it; compare quality on a model that beats the bigram "
                 "(docs/results.md).")
    return lines
