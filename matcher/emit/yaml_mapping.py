"""``--emit yaml``: the mapping file, templated per layer, headed by what it was made from.

Loading it back (``Mapping.load``, ``match --mapping FILE``) gives the same rules; what the
mapping does not decide yet is listed in comments at the end, for the reader to fill in.
"""

from __future__ import annotations

from . import Subject, register


@register("yaml")
def emit_yaml(subject: Subject) -> str:
    target = subject.target_class or "the target"
    header = [
        f"# matcher mapping for {target}, made by `match --emit yaml` from {subject.made_from}.",
        "# {i} stands for a layer index: each rule is applied to every layer the checkpoint has.",
        "# Review it, then pin it: match SRC --target CLASS --mapping THIS_FILE",
    ]
    footer = []
    if subject.missing:
        footer = ["", f"# Not decided yet ({len(subject.missing)}); add a rule or a dropped/initialised entry for each:"]
        footer += [f"#   {line}" for line in subject.missing]
    return "\n".join(header) + "\n" + subject.mapping.to_yaml() + ("\n".join(footer) + "\n" if footer else "")
