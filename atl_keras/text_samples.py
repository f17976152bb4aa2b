"""Deterministic multilingual sentences for checking and benchmarking text encoders.

    from atl_keras.text_samples import varied_sentences
    texts = varied_sentences(1200)   # 15 languages, 1-80 words, numbers, punctuation, emoji

Used by the USE port's equivalence test and `tools/bench_text_encoder.py`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["varied_sentences"]

WORDS = {
    "en": "red cotton shirt with long sleeves and a round neck for summer evenings the black boots".split(),
    "de": "ein rotes Baumwollhemd mit langen Ärmeln für den Sommer schwarze Stiefel aus Leder".split(),
    "fr": "une chemise rouge en coton à manches longues pour l'été bottes noires en cuir".split(),
    "es": "una camisa roja de algodón con mangas largas para el verano botas negras de cuero".split(),
    "pt": "uma camisa vermelha de algodão com mangas compridas para o verão botas pretas".split(),
    "it": "una camicia rossa di cotone a maniche lunghe per l'estate stivali neri di pelle".split(),
    "ru": "красная хлопковая рубашка с длинными рукавами для лета чёрные кожаные сапоги".split(),
    "pl": "czerwona bawełniana koszula z długimi rękawami na lato czarne skórzane buty".split(),
    "tr": "yaz için uzun kollu kırmızı pamuklu gömlek siyah deri çizmeler".split(),
    "ar": "قميص قطني أحمر بأكمام طويلة للصيف وحذاء جلدي أسود".split(),
    "zh": ["红色", "棉质", "长袖", "衬衫", "适合", "夏天", "黑色", "皮靴", "。", "，"],
    "ja": ["赤い", "綿の", "長袖", "シャツ", "夏", "向け", "黒い", "革の", "ブーツ", "です"],
    "ko": "여름용 빨간 면 셔츠 긴 소매 검은 가죽 부츠".split(),
    "th": ["เสื้อ", "ผ้าฝ้าย", "สีแดง", "แขนยาว", "รองเท้า", "บูท", "หนัง", "สีดำ"],
    "hi": "गर्मियों के लिए लाल सूती शर्ट काले चमड़े के जूते".split(),
}
EXTRAS = ["42", "3.14", "1,299.00", "€19,99", "$5", "100%", "2024-06-01", "#7", "(XL)", "M/L",
          "!", "?", "...", "—", "«", "»", "\"", "'", "🙂", "👕", "👢", "ß", "Ω", "∑", "½",
          "NAÏVE", "CAFÉ", "e\u0301", "ﬁ", "Ｔシャツ", "\t", "  "]


def varied_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic sentences: 15 languages, 1-80 words, numbers, punctuation, emoji."""
    rng = np.random.default_rng(seed)
    langs = sorted(WORDS)
    out = ["", " ", "a", "Hello, world!", "🙂", "東京", "12345", "Ω≈ç√∫"]
    while len(out) < n:
        lang = langs[rng.integers(len(langs))]
        length = int(rng.choice([1, 2, 3, 5, 8, 13, 21, 40, 80]))
        words = []
        for _ in range(length):
            r = rng.random()
            if r < 0.15:
                words.append(EXTRAS[rng.integers(len(EXTRAS))])
            elif r < 0.20:  # code-switching
                other = WORDS[langs[rng.integers(len(langs))]]
                words.append(other[rng.integers(len(other))])
            else:
                words.append(WORDS[lang][rng.integers(len(WORDS[lang]))])
        sep = "" if lang in ("zh", "ja", "th") and rng.random() < 0.5 else " "
        text = sep.join(words)
        if rng.random() < 0.3:
            text = text.capitalize() + rng.choice([".", "!", "?", ""])
        out.append(text)
    return out
