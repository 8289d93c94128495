"""dn keys: the Fernet keys that encrypt platform API keys and other secrets in the database."""
from __future__ import annotations

import typer

app = typer.Typer(help="Platform API key encryption (Fernet keys from $DN_FERNET_KEYS): rotate, status.",
                  no_args_is_help=True)


@app.command("rotate")
def rotate(
    ctx: typer.Context,
    retire_old: bool = typer.Option(False, "--retire-old",
                                    help="afterwards record every key but the newest as retired (refused while a value is under one)"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Re-encrypt every stored value under the newest key of $DN_FERNET_KEYS (comma-separated,
    newest first), in batches; rerun after an interruption to continue. Audited."""
    from dn.gdpr import keys

    c = ctx.obj
    res = keys.rotate(c, retire_old=retire_old, progress=lambda s: c.err.print(s, markup=False, soft_wrap=True))
    if json:
        c.out_json(res.to_dict())
        return
    total = sum(res.reencrypted.values())
    c.out(f"primary key {res.primary}: re-encrypted {total} value(s) in {res.batches} batch(es)")
    for col, n in res.reencrypted.items():
        c.out(f"  {col:<45} {n}")
    if retire_old:
        c.out(f"retired: {', '.join(res.retired) or 'none'}; remove them from $DN_FERNET_KEYS")


@app.command("status")
def status(
    ctx: typer.Context,
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """How many stored values are under each key id, and each key's role (primary, active,
    retired, unknown). Exits 4 when a value is under a retired or unknown key."""
    from dn.errors import PolicyViolation
    from dn.gdpr import keys

    c = ctx.obj
    st = keys.key_status(c)
    if json:
        c.out_json(st.to_dict())
    else:
        for k in st.keys:
            env = "in env" if k.in_environment else "not in env"
            c.out(f"{k.key_id:<18} {k.role:<8} {k.values:>8} value(s)  {env}"
                  + (f"  retired {k.retired_at[:10]}" if k.retired_at else ""))
        if st.unsealed:
            c.out(f"{'(no key id)':<18} {'':<8} {st.unsealed:>8} value(s)")
        for p in st.problems:
            c.err.print(f"[yellow]problem:[/] {p}", soft_wrap=True)
    if st.problems:
        raise PolicyViolation("; ".join(st.problems), runbook="key-rotation")
