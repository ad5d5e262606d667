"""``npformer explain NAME``: a layer's derivation, its gradient check live, and pictures.

NAME is a registered gradient check (``npformer gradcheck --list``) or a docs page
(``rmsnorm``, ``attention``, ``llama3``, ...). The command prints

1. the ``## Forward`` and ``## Derivation`` sections of the layer's docs page
   (docs/<section>/<page>.md: the same source as the rendered study guide, not a second
   copy), with the LaTeX turned into Unicode a terminal shows (:func:`latex_to_text`);
2. the gradient check run live: a few entries per tensor with the analytic gradient (the
   hand-derived backward), the central finite difference and their difference, side by
   side, then each tensor's max errors (the table of ``npformer gradcheck``);
3. with ``--png DIR``, pictures (npformer.explain_pictures): the analytic-vs-numeric
   scatter of the check, and the softmax Jacobian, every preset's attention masks or RoPE's
   rotation where the name is about them.

Every registered check maps to its page through :data:`CHECK_PAGES`, one explicit table;
every page that has no check of its own names the check or whole-model preset check it runs
in :data:`PAGE_RUNS`. The docs are found next to the package (a source checkout, installed
with ``pip install -e .``), or at ``$NPFORMER_DOCS``, or at ``--docs DIR``.

LaTeX for a terminal
--------------------
:func:`latex_to_text` converts the macros the pages use::

    \\frac{a}{b} → a/b (parentheses around a compound part)   \\sqrt{v + ε} → √(v + ε)
    \\sum_{k=1}^{V} → Σₖ₌₁ⱽ     \\odot → ⊙     p^\\top → pᵀ     \\bar y → ȳ     \\hat x → x̂
    Greek letters, ∂ ℓ ∞ ≤ ⟨ ⟩ …, \\operatorname{softmax} / \\text{…} / \\log → their words,
    sub- and superscripts → Unicode small characters where every character has one.

What it cannot convert stays LaTeX rather than turning into something wrong: an unknown
macro keeps its backslash and arguments (``\\foo{x}``), an environment other than an
aligned one is copied as written, and a sub/superscript with a character Unicode has no
small form of keeps its ``_``/``^`` (``e^{zᵢ}``). :func:`markdown_to_text` applies it to the
maths of a page section, keeps code blocks as written and turns links into their text.
"""

from __future__ import annotations

import functools
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np


_QUAD = "\x00"  # a space that survives the collapsing of source whitespace

GREEK = {
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "varepsilon": "ε",
    "zeta": "ζ", "eta": "η", "theta": "θ", "vartheta": "ϑ", "iota": "ι", "kappa": "κ",
    "lambda": "λ", "mu": "μ", "nu": "ν", "xi": "ξ", "pi": "π", "rho": "ρ", "sigma": "σ",
    "tau": "τ", "upsilon": "υ", "phi": "φ", "varphi": "φ", "chi": "χ", "psi": "ψ",
    "omega": "ω", "Gamma": "Γ", "Delta": "Δ", "Theta": "Θ", "Lambda": "Λ", "Xi": "Ξ",
    "Pi": "Π", "Sigma": "Σ", "Phi": "Φ", "Psi": "Ψ", "Omega": "Ω",
}
SYMBOLS = {
    **GREEK,
    "sum": "Σ", "prod": "∏", "odot": "⊙", "otimes": "⊗", "oplus": "⊕", "cdot": "·",
    "times": "×", "partial": "∂", "nabla": "∇", "ell": "ℓ", "infty": "∞", "le": "≤",
    "leq": "≤", "ge": "≥", "geq": "≥", "ne": "≠", "neq": "≠", "approx": "≈", "equiv": "≡",
    "sim": "∼", "propto": "∝", "in": "∈", "notin": "∉", "subset": "⊂", "to": "→",
    "rightarrow": "→", "leftarrow": "←", "Rightarrow": "⇒", "mapsto": "↦", "pm": "±",
    "mp": "∓", "ldots": "…", "cdots": "⋯", "dots": "…", "langle": "⟨", "rangle": "⟩",
    "lvert": "|", "rvert": "|", "lVert": "‖", "rVert": "‖", "|": "‖", "gg": "≫", "ll": "≪",
    "top": "⊤", "intercal": "⊤", "forall": "∀", "exists": "∃", "circ": "∘", "star": "⋆",
    "Longrightarrow": "⟹", "Leftrightarrow": "⇔", "iff": "⟺", "implies": "⟹",
    "lesssim": "≲", "gtrsim": "≳", "parallel": "∥", "perp": "⊥", "cap": "∩", "cup": "∪",
    "lfloor": "⌊", "rfloor": "⌋", "lceil": "⌈", "rceil": "⌉", "emptyset": "∅",
    "quad": _QUAD * 2, "qquad": _QUAD * 4, ",": " ", ";": " ", ":": " ", "!": "", " ": " ",
    "{": "{", "}": "}", "_": "_", "%": "%", "#": "#", "&": "&", "$": "$",
}
# operators and relations, written with a space either side
BINARY = {"odot", "otimes", "oplus", "cdot", "times", "le", "leq", "ge", "geq", "ne", "neq",
          "approx", "equiv", "sim", "propto", "in", "notin", "subset", "to", "rightarrow",
          "leftarrow", "Rightarrow", "mapsto", "pm", "mp", "circ", "gg", "ll", "Longrightarrow",
          "Leftrightarrow", "iff", "implies", "lesssim", "gtrsim", "parallel", "cap", "cup"}
# the space after these is not a separation: \partial \ell is ∂ℓ
TIGHT = {"partial", "nabla", "langle", "lvert", "lVert", "lfloor", "lceil"}
# multi-line layouts whose & only aligns and whose \\ only breaks the line
ALIGNED = {"aligned", "align", "align*", "gathered", "split", "equation", "equation*"}
# upright words: \log x → log x
NAMED = {"log", "exp", "max", "min", "arg", "argmax", "argmin", "tanh", "sinh", "cosh", "sech",
         "sin", "cos", "tan", "det", "lim", "sup", "inf", "erf", "sgn", "diag", "ln"}
# size and spacing wrappers that only change how big a delimiter is drawn: dropped
SIZES = {"left", "right", "big", "Big", "bigg", "Bigg", "bigl", "bigr", "Bigl", "Bigr",
         "biggl", "biggr", "Biggl", "Biggr", "middle", "displaystyle", "textstyle",
         "limits", "nolimits"}
# one argument, written as its content
TEXT_LIKE = {"text", "textrm", "textit", "textbf", "mathrm", "operatorname", "mathit", "mathbf",
             "boldsymbol", "bm", "mathsf", "mathtt", "boxed", "underbrace", "overbrace",
             "mathcal", "mathscr", "mathrel", "mathop", "mathbin", "underline"}
# matrices, written inline row by row: [[a, b], [c, d]]; cases: { a if …; b otherwise }
MATRICES = {"pmatrix", "bmatrix", "matrix", "vmatrix", "Bmatrix", "smallmatrix"}
BLACKBOARD = {"R": "ℝ", "N": "ℕ", "Z": "ℤ", "Q": "ℚ", "C": "ℂ", "E": "𝔼", "1": "𝟙"}
ACCENTS = {"bar": "\u0304", "overline": "\u0305", "hat": "\u0302", "widehat": "\u0302",
           "tilde": "\u0303", "widetilde": "\u0303", "dot": "\u0307", "vec": "\u20d7"}

SUBSCRIPTS = dict(zip("0123456789+-=()aehijklmnoprstuvxβγρφχ−",
                      "₀₁₂₃₄₅₆₇₈₉₊₋₌₍₎ₐₑₕᵢⱼₖₗₘₙₒₚᵣₛₜᵤᵥₓᵦᵧᵨᵩᵪ₋"))
SUPERSCRIPTS = dict(zip("0123456789+-=()abcdefghijklmnoprstuvwxyzABDEGHIJKLMNOPRTUVWβγδθφχ−⊤′",
                        "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁼⁽⁾ᵃᵇᶜᵈᵉᶠᵍʰⁱʲᵏˡᵐⁿᵒᵖʳˢᵗᵘᵛʷˣʸᶻᴬᴮᴰᴱᴳᴴᴵᴶᴷᴸᴹᴺᴼᴾᴿᵀᵁⱽᵂᵝᵞᵟᶿᵠᵡ⁻ᵀ′"))
_COMPOUND = re.compile(r"[\s+\-−=<>≤≥,·×/⊙∈→]")


class _Parser:
    """A small recursive-descent reader of one LaTeX maths string."""

    def __init__(self, tex: str):
        self.tex = tex
        self.pos = 0

    def peek(self) -> str:
        return self.tex[self.pos] if self.pos < len(self.tex) else ""

    def sequence(self, closing: str = "") -> str:
        """Atoms up to ``closing`` (consumed) or the end; whitespace collapses to one space."""
        out: List[str] = []
        while self.pos < len(self.tex):
            char = self.peek()
            if closing and char == closing:
                self.pos += 1
                break
            if char.isspace():
                while self.peek().isspace():
                    self.pos += 1
                out.append(" ")
                continue
            if char in "^_":
                self.pos += 1
                out.append(self.script(char, self.argument()))
                continue
            out.append(self.atom())
        return "".join(out)

    def skip_space(self) -> None:
        while self.peek().isspace():
            self.pos += 1

    def argument(self) -> str:
        """A macro's argument: a {group}, a \\macro, or one character."""
        self.skip_space()
        char = self.peek()
        if char == "{":
            self.pos += 1
            return self.sequence("}")
        if char == "\\":
            return self.atom()
        self.pos += 1
        return char

    def raw_groups(self) -> str:
        """The {groups} that follow, as written (the arguments of an unknown macro)."""
        start = self.pos
        while self.peek() == "{":
            depth = 0
            while self.pos < len(self.tex):
                depth += {"{": 1, "}": -1}.get(self.tex[self.pos], 0)
                self.pos += 1
                if depth == 0:
                    break
        return self.tex[start:self.pos]

    def raw_group(self) -> str:
        """The text of a {group} as written (for \\begin{name})."""
        self.skip_space()
        if self.peek() != "{":
            return ""
        end = self.tex.find("}", self.pos)
        end = len(self.tex) if end < 0 else end
        text = self.tex[self.pos + 1:end]
        self.pos = end + 1
        return text

    def atom(self) -> str:
        char = self.peek()
        if char == "{":
            self.pos += 1
            return self.sequence("}")
        if char != "\\":
            self.pos += 1
            return char
        if self.tex.startswith("\\\\", self.pos):  # \\ ends a line
            self.pos += 2
            return "\n"
        match = re.compile(r"\\([A-Za-z]+|.)").match(self.tex, self.pos)
        if match is None:  # a trailing backslash
            self.pos += 1
            return "\\"
        name = match.group(1)
        self.pos = match.end()
        if name in TIGHT:  # elsewhere a space after a macro name stays a space
            self.skip_space()
        return self.macro(name, match.group(0))

    def macro(self, name: str, written: str) -> str:
        if name in BINARY:
            return f" {SYMBOLS[name]} "
        if name in SYMBOLS:
            return SYMBOLS[name]
        if name in NAMED:  # \log\sum_k → "log Σₖ", \max_k → "maxₖ"
            following = self.peek()
            return name + (" " if following and following not in " \t\n(_^[{}|" else "")
        if name in SIZES:
            return ""
        if name in ("frac", "dfrac", "tfrac"):
            numerator, denominator = self.argument(), self.argument()
            return f"{_grouped(numerator)}/{_grouped(denominator)}"
        if name == "sqrt":
            return "√" + _grouped(self.argument())
        if name in TEXT_LIKE:
            return self.argument()
        if name == "mathbb":
            letter = self.argument()
            return BLACKBOARD.get(letter, letter)
        if name in ACCENTS:
            base = self.argument()
            if sum(not unicodedata.combining(c) for c in base) == 1:  # x, or x̂ for \bar{\hat x}
                return base + ACCENTS[name]
            return f"\\{name}{{{base}}}"
        if name == "begin":
            environment = self.raw_group()
            closing = f"\\end{{{environment}}}"
            end = self.tex.find(closing, self.pos)
            body = self.tex[self.pos:len(self.tex) if end < 0 else end]
            self.pos = len(self.tex) if end < 0 else end + len(closing)
            if environment in ALIGNED and end >= 0:
                return _Parser(body.replace("&", " ")).sequence()
            if environment in MATRICES | {"cases"} and end >= 0:
                rows = [[" ".join(_Parser(cell).sequence().split()) for cell in row.split("&")]
                        for row in body.split("\\\\") if row.strip()]
                if environment == "cases":
                    return "{ " + "; ".join(", ".join(row) for row in rows) + " }"
                return "[" + ", ".join("[" + ", ".join(row) + "]" for row in rows) + "]"
            return f"\\begin{{{environment}}}{body}{closing if end >= 0 else ''}"
        return written + self.raw_groups()  # unknown: left as LaTeX, its arguments too

    def script(self, kind: str, text: str) -> str:
        """A sub- (``_``) or superscript: Unicode small characters when each has one."""
        table = SUBSCRIPTS if kind == "_" else SUPERSCRIPTS
        stripped = text.strip()
        if stripped and all(c in table for c in stripped):
            return "".join(table[c] for c in stripped)
        if kind == "^" and stripped in ("⊤", "T"):
            return "ᵀ"
        if len(stripped) == 1:
            return kind + stripped
        return f"{kind}{{{stripped}}}"


def _grouped(text: str) -> str:
    """``text`` as an operand of / or √: in parentheses when it has an operator or a space
    outside the brackets it already has (√(v + ε) is one operand, a + b is not)."""
    text = text.strip()
    depth = 0
    for char in text:
        depth += (char in "([{⟨") - (char in ")]}⟩")
        if depth == 0 and _COMPOUND.match(char):
            return f"({text})"
    return text


def latex_to_text(tex: str) -> str:
    """One LaTeX maths string (without its ``$`` delimiters) as terminal-readable Unicode."""
    converted = _Parser(tex).sequence()
    lines = [re.sub(f" *({_QUAD}+) *", r"\1", re.sub(r"[ \t]+", " ", line)).strip(" ")
             .replace(" ⟩", "⟩").replace(_QUAD, " ") for line in converted.split("\n")]
    return "\n".join(lines).strip("\n")


_FENCE = re.compile(r"^\s*(```|~~~)")
_DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.S)
_INLINE = re.compile(r"(?<![\\$])\$(?![$\s])([^$]+?)(?<![\\$])\$(?!\$)")
_INLINE_CODE = re.compile(r"(`+)([^`]+?)\1")
_LINK = re.compile(r"!?\[([^\]]+)\](?:\([^)]*\)|\[[^\]]*\])")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _prose_to_text(text: str) -> str:
    """Inline maths, links and bold of a stretch of prose (inline code left as written)."""
    pieces: List[str] = []
    last = 0
    for match in _INLINE_CODE.finditer(text):
        pieces.append(_prose_piece(text[last:match.start()]))
        pieces.append(match.group(0))
        last = match.end()
    pieces.append(_prose_piece(text[last:]))
    return "".join(pieces)


def _prose_piece(text: str) -> str:
    text = _DISPLAY.sub(lambda m: latex_to_text(m.group(1)), text)  # $$…$$ within a line
    text = _INLINE.sub(lambda m: latex_to_text(m.group(1)), text)
    text = _LINK.sub(lambda m: m.group(1), text)
    return _BOLD.sub(lambda m: m.group(1), text)


def _blocks(markdown: str) -> List[Tuple[str, str]]:
    """The page cut into ("code", text), ("display", latex) and ("prose", text) blocks."""
    blocks: List[Tuple[str, str]] = []
    lines = markdown.split("\n")
    i = 0
    prose: List[str] = []

    def flush():
        if prose:
            blocks.append(("prose", "\n".join(prose)))
            prose.clear()

    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            flush()
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith(fence.group(1)):
                end += 1
            blocks.append(("code", "\n".join(lines[i:end + 1])))
            i = end + 1
            continue
        if line.strip().startswith("$$"):
            flush()
            body = [line.strip()[2:]]
            end = i
            if body[0].rstrip().endswith("$$") and len(body[0].strip()) >= 2:
                body[0] = body[0].rstrip()[:-2]
            else:
                end = i + 1
                while end < len(lines) and "$$" not in lines[end]:
                    body.append(lines[end])
                    end += 1
                if end < len(lines):
                    body.append(lines[end].split("$$")[0])
            blocks.append(("display", "\n".join(body)))
            i = end + 1
            continue
        prose.append(line)
        i += 1
    flush()
    return blocks


def markdown_to_text(markdown: str, indent: str = "    ") -> str:
    """A Markdown page section for a terminal: display maths converted and indented on its own
    lines, inline maths converted in prose and tables, code blocks kept as written, links
    reduced to their text, mkdocstrings ``::: object`` directives dropped."""
    out: List[str] = []
    for kind, text in _blocks(markdown):
        if kind == "code":
            out.append(text)
        elif kind == "display":
            converted = latex_to_text(text)
            out.append("\n".join(indent + line if line else "" for line in converted.split("\n")))
        else:
            lines: List[str] = []
            skipping_options = False
            for line in text.split("\n"):
                if line.startswith(":::"):
                    skipping_options = True
                    continue
                if skipping_options and (line.startswith(" ") or not line.strip()):
                    if not line.strip():
                        skipping_options = False
                    continue
                skipping_options = False
                lines.append(line)
            out.append(_prose_to_text("\n".join(lines)))  # inline maths may wrap a line
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n")


# --------------------------------------------------------------------------------------
# The docs pages and which check explains which
# --------------------------------------------------------------------------------------

DOCS_ENV = "NPFORMER_DOCS"  # a docs directory to read instead of the one beside the package

PAGES_WITHOUT_DERIVATION = ("index", "notation")

# Every registered gradient check and the page that derives what it checks.
CHECK_PAGES: Dict[str, str] = {
    # attention: the core, with head sharing (multi-query, grouped-query) and cross-attention
    "attention_mha": "functional/attention", "attention_mqa": "functional/attention",
    "attention_gqa": "functional/attention", "attention_cross": "functional/attention",
    "mha_module": "functional/attention",
    "attention_gate": "functional/attention_gate",  # Bondarenko et al.'s gated attention
    # which keys a query may see
    "attention_causal": "functional/attention_mask", "attention_window": "functional/attention_mask",
    "attention_document": "functional/attention_mask",
    "attention_padding": "functional/attention_mask",
    # the softmax alternatives (softmax₁, clipped, soft-capping, also of the final logits)
    "attention_softmax1": "functional/softmax_variants",
    "attention_clipped": "functional/softmax_variants",
    "sink_softmax": "functional/softmax_variants", "attention_sink": "functional/softmax_variants",
    "attention_clipped_length_aware": "functional/softmax_variants",
    "attention_softcap": "functional/softmax_variants",
    "final_softcap": "functional/softmax_variants",
    # the fused attention kernels
    **{f"kernel_{k}": "kernels/flash_attention"
       for k in ("causal", "window", "document", "gqa", "cross", "softmax1", "sink", "softcap")},
    # the fused layer kernels of the training step
    **{f"fused_{k}": "kernels/training_step_kernels"
       for k in ("layernorm", "rmsnorm", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "rope",
                 "residual_dropout", "cross_entropy", "embedding")},
    "linear": "functional/linear", "linear_nobias": "functional/linear",
    "embedding": "functional/embedding",
    "layernorm": "functional/layernorm",
    "rmsnorm": "functional/rmsnorm", "rmsnorm_unit_offset": "functional/rmsnorm",
    "relu": "functional/relu",
    "gelu": "functional/gelu", "gelu_tanh": "functional/gelu",
    "silu": "functional/silu",
    "swiglu": "functional/glu", "geglu": "functional/glu", "geglu_tanh": "functional/glu",
    "softmax": "functional/softmax", "log_softmax": "functional/softmax",
    "cross_entropy": "functional/cross_entropy", "cross_entropy_smoothing": "functional/cross_entropy",
    "dropout": "functional/dropout",
    "sinusoidal": "functional/positions", "learned_positions": "functional/positions",
    **{f"rope_{k}": "functional/rope"
       for k in ("half", "interleaved", "partial", "linear", "dynamic", "yarn", "llama3")},
    # Qwen3 / Gemma 3's q/k norms and Gemma 2's sandwich block
    "qk_norm": "lineage/todays_checkpoints",
    "sandwich_block": "blocks/sandwich",
}

# What ``explain PAGE`` runs: ("check", a registered check) or ("preset", a preset whose
# tiny model ``npformer gradcheck --preset`` checks end to end, every parameter).
PAGE_RUNS: Dict[str, Tuple[str, str]] = {
    "functional/linear": ("check", "linear"), "functional/embedding": ("check", "embedding"),
    "functional/layernorm": ("check", "layernorm"), "functional/rmsnorm": ("check", "rmsnorm"),
    "functional/relu": ("check", "relu"), "functional/gelu": ("check", "gelu"),
    "functional/silu": ("check", "silu"), "functional/glu": ("check", "swiglu"),
    "functional/dropout": ("check", "dropout"), "functional/positions": ("check", "sinusoidal"),
    "functional/erf": ("check", "gelu"),  # erf's one use: the exact GeLU
    "functional/rope": ("check", "rope_half"), "functional/softmax": ("check", "softmax"),
    "functional/cross_entropy": ("check", "cross_entropy"),
    "functional/softmax_variants": ("check", "attention_softmax1"),
    "functional/attention": ("check", "attention_gqa"),
    "functional/attention_gate": ("check", "attention_gate"),
    "functional/attention_mask": ("check", "attention_document"),
    "kernels/flash_attention": ("check", "kernel_document"),
    "kernels/training_step_kernels": ("check", "fused_rmsnorm"),
    "blocks/post_norm": ("preset", "gpt1"), "blocks/pre_norm": ("preset", "gpt2"),
    "blocks/parallel": ("preset", "gpt-j"), "blocks/sandwich": ("check", "sandwich_block"),
    "blocks/cross_attention": ("check", "attention_cross"),
    "models/decoder": ("preset", "gpt2"), "models/encoder_decoder": ("preset", "transformer-2017"),
    "models/training_step": ("preset", "llama3"),
    **{f"lineage/{p}": ("preset", p) for p in (
        "transformer-2017", "gpt1", "gpt2", "gpt3", "gpt-neo", "gpt-j", "gpt-neox", "palm",
        "llama1", "llama2", "llama3")},
    "lineage/todays_checkpoints": ("check", "qk_norm"),
}
# Every page of the study guide (docs/<page>.md): the two without a derivation, then the rest
PAGES = PAGES_WITHOUT_DERIVATION + tuple(PAGE_RUNS)


def page_name(page: str) -> str:
    """The short name of a page: functional/rmsnorm → rmsnorm."""
    return page.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Subject:
    """What ``explain NAME`` explains: the page, and the check it runs."""

    name: str  # as given
    page: str  # e.g. "functional/rmsnorm"
    kind: str  # "check" or "preset"
    run: str  # the check's or the preset's name


def resolve(name: str) -> Subject:
    """The page and check of NAME (a registered check or a page's short name)."""
    from .gradcheck import registered_checks

    checks = registered_checks()
    if name in checks:
        if name not in CHECK_PAGES:
            raise ValueError(f"the gradient check {name!r} has no docs page in "
                             "npformer.explain.CHECK_PAGES; add it there")
        return Subject(name, CHECK_PAGES[name], "check", name)
    pages = {page_name(p): p for p in PAGE_RUNS}
    if name in pages:
        kind, run = PAGE_RUNS[pages[name]]
        return Subject(name, pages[name], kind, run)
    import difflib

    close = difflib.get_close_matches(name, sorted(set(checks) | set(pages)), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown name {name!r}{hint} Give a registered gradient check "
                     f"(npformer gradcheck --list: {len(checks)} of them) or a docs page: "
                     f"{', '.join(sorted(pages))}")


def docs_directory(docs_dir: Optional[str] = None) -> Path:
    """``docs_dir``, else ``$NPFORMER_DOCS``, else docs/ beside the package (a source
    checkout: ``pip install -e .``). A ValueError naming the path when it is absent."""
    where = docs_dir or os.environ.get(DOCS_ENV)
    path = Path(where) if where else Path(__file__).resolve().parent.parent / "docs"
    if not path.is_dir():
        source = ("given" if docs_dir else f"from ${DOCS_ENV}") if where else "beside the package"
        raise ValueError(f"no docs directory at {path} ({source}): npformer explain reads the "
                         "derivations from the docs/ of a source checkout (pip install -e .); "
                         f"point --docs DIR or ${DOCS_ENV} at one")
    return path


_HEADING = re.compile(r"^(#{1,2})\s+(.*?)\s*#*\s*$")


def page_sections(path: Path) -> Dict[str, str]:
    """The level-1/2 sections of a Markdown page by heading (``## Forward`` → "Forward"),
    code blocks not mistaken for headings."""
    sections: Dict[str, List[str]] = {}
    current: Optional[List[str]] = None
    fence = ""
    for line in path.read_text(encoding="utf-8").split("\n"):
        stripped = line.strip()
        if fence:
            fence = "" if stripped.startswith(fence) else fence
        elif stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
        else:
            heading = _HEADING.match(line)
            if heading:
                current = sections.setdefault(heading.group(2), []) if len(heading.group(1)) == 2 else None
                continue
        if current is not None:
            current.append(line)
    return {title: "\n".join(lines).strip("\n") for title, lines in sections.items()}


def derivation(page: str, docs_dir: Optional[str] = None) -> Tuple[Path, str, str]:
    """``(path, forward, derivation)``: the two sections of a page, as written (Markdown)."""
    path = docs_directory(docs_dir) / f"{page}.md"
    if not path.is_file():
        raise ValueError(f"no docs page {path}: the study guide's page {page}.md is missing "
                         "from the docs directory")
    sections = page_sections(path)
    missing = [title for title in ("Forward", "Derivation") if not sections.get(title, "").strip()]
    if missing:
        raise ValueError(f"docs page {path} has no (or an empty) '## {missing[0]}' section; its "
                         f"sections: {', '.join(sections) or 'none'}")
    return path, sections["Forward"], sections["Derivation"]


# --------------------------------------------------------------------------------------
# The check, run live, and its entries side by side
# --------------------------------------------------------------------------------------

@dataclass
class CheckRun:
    """One run of a subject's check: the per-tensor reports and their compared entries."""

    title: str
    reports: list  # [TensorReport]
    entries: list  # [GradientEntries], entries[i] behind reports[i]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.reports)


@functools.lru_cache(maxsize=None)
def run_check(kind: str, name: str) -> CheckRun:
    """Run a registered check or a preset's whole-model check, recording every entry.

    The checks are seeded, so a second call (a test explaining a name twice) reuses the
    first; the returned run must not be modified."""
    from .gradcheck import DEFAULT_STEP, recording_entries, registered_checks

    with recording_entries() as entries:
        if kind == "preset":
            from .checks.models import check_preset

            reports = check_preset(name)
            title = (f"npformer gradcheck --preset {name}: a tiny float64 {name} model, "
                     "loss = mean cross-entropy, every parameter tensor")
        else:
            reports = registered_checks()[name]()
            title = f"npformer gradcheck {name}"
    if len(reports) != len(entries):
        raise RuntimeError(f"check {name!r} returned {len(reports)} reports for {len(entries)} "
                           "compared tensors; it must build every report with check_gradients")
    title += f" (float64, central differences, h = {DEFAULT_STEP:g})"
    return CheckRun(title, list(reports), list(entries))


def _shown_positions(analytic: np.ndarray, numeric: np.ndarray, n_first: int) -> List[int]:
    """The first ``n_first`` compared entries and the one with the largest difference."""
    shown = list(range(min(n_first, len(analytic))))
    if len(analytic):
        worst = int(np.argmax(np.abs(analytic - numeric)))
        if worst not in shown:
            shown.append(worst)
    return shown


def side_by_side(run: CheckRun, n_first: int = 3) -> str:
    """Per tensor: a few entries (index, analytic, numeric, difference), the first ones and
    the worst, then the per-tensor max errors of ``npformer gradcheck``."""
    from .gradcheck import format_table

    lines = [run.title, ""]
    for report, entries in zip(run.reports, run.entries):
        lines.append(f"{report.tensor}, shape {tuple(entries.shape)}: {report.n_checked} of "
                     f"{report.n_total} entries compared")
        rows = [("index", "analytic", "numeric", "difference")]
        worst = int(np.argmax(np.abs(entries.analytic - entries.numeric))) if report.n_checked else -1
        for k in _shown_positions(entries.analytic, entries.numeric, n_first):
            index = np.unravel_index(int(entries.flat_indices[k]), entries.shape)
            a, n = entries.analytic[k], entries.numeric[k]
            rows.append((str(tuple(int(i) for i in index)), f"{a:+.12e}", f"{n:+.12e}",
                         f"{a - n:+.1e}" + ("  (largest)" if k == worst else "")))
        widths = [max(len(row[c]) for row in rows) for c in range(3)]
        lines += ["  " + "  ".join(row[c].ljust(widths[c]) for c in range(3)) + "  " + row[3]
                  for row in rows]
        lines.append("")
    lines.append(format_table(run.reports))
    return "\n".join(lines)


def explain_text(name: str, docs_dir: Optional[str] = None) -> Tuple[str, CheckRun, Subject]:
    """Everything ``npformer explain NAME`` prints, the check run and the subject."""
    subject = resolve(name)
    path, forward, derived = derivation(subject.page, docs_dir)
    run = run_check(subject.kind, subject.run)
    others = sorted(c for c, p in CHECK_PAGES.items() if p == subject.page and c != subject.run)
    rule = "=" * 78
    parts = [rule, f"npformer explain {name}: {path}",
             f"checked by: {run.title.split(' (')[0]}"
             + (f"; more checks of this page: {', '.join(others)}" if others else ""), rule, "",
             "## Forward", "", markdown_to_text(forward), "",
             "## Derivation", "", markdown_to_text(derived), "",
             "## Analytic vs finite-difference gradients", "", side_by_side(run)]
    return "\n".join(parts), run, subject


def explain_command(name: str, png_dir: Optional[str] = None, docs_dir: Optional[str] = None) -> int:
    """``npformer explain``: print, draw; exit code 0, or 1 when a gradient check fails.
    Bad input raises ValueError (the CLI prints it on one line, exit code 2)."""
    text, run, subject = explain_text(name, docs_dir)
    print(text)
    if png_dir is not None:
        from .explain_pictures import write_pictures

        for path in write_pictures(subject, run, png_dir):
            print(f"wrote {path}")
    return 0 if run.passed else 1
