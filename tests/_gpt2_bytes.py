"""GPT-2's byte -> printable unicode map, shared by the tokenizer and GGUF loader tests (an
independent reference: the package's tokenizers never import it)."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
