/* Prompt lookup (n-gram) proposals: find an earlier occurrence of the context's last n tokens and
 * propose the tokens that followed it.
 *
 * Read the context backwards, r[x] = tokens[len - 1 - x]: the last n tokens are r[0:n]. A copy of
 * r[0:n] in r that ends at t (t >= n, so not r[0:n] itself) is an occurrence in the context that
 * starts at s = len - 1 - t and is followed by tokens[s + n], s + n <= len - 1. One Knuth-Morris-
 * Pratt pass over r[1:] with the pattern r[0:m], m = min(max_n, len - 1), gives at every t the
 * longest such n <= m: O(len) time, O(max_n) memory. The longest n over all t wins; among matches
 * of that length the largest t, i.e. the earliest occurrence in the context
 * (tessera/spec_decode/ngram_proposer.py says why).
 */
#include <stdint.h>
#include <stdlib.h>

#define REV(x) tokens[len - 1 - (x)]

/* Writes up to k proposed tokens to out and returns their number (0: no match of length >= min_n).
 * fail: scratch of max_n ints. */
static int propose_one(const int32_t* tokens, int64_t len, int min_n, int max_n, int k, int32_t* fail,
                       int32_t* out) {
    if (k <= 0 || len < 2 || len - 1 < min_n) return 0;
    int m = max_n < len - 1 ? max_n : (int)(len - 1);
    /* failure function of the pattern r[0:m]: fail[q] = longest proper border of r[0:q+1] */
    fail[0] = 0;
    for (int q = 1, b = 0; q < m; q++) {
        while (b > 0 && REV(q) != REV(b)) b = fail[b - 1];
        if (REV(q) == REV(b)) b++;
        fail[q] = b;
    }
    int best = 0;
    int64_t best_t = 0;
    for (int64_t t = 1, v = 0; t < len; t++) {
        while (v > 0 && REV(t) != REV(v)) v = fail[v - 1];
        if (REV(t) == REV(v)) v++;
        if (v >= best) {
            best = (int)v;
            best_t = t;
        }
        if (v == m) v = fail[m - 1]; /* a full match: continue from its longest border */
    }
    if (best < min_n || best == 0) return 0;
    int64_t start = len - 1 - best_t + best; /* first token after the occurrence; <= len - 1 */
    int64_t avail = len - start;
    int n = k < avail ? k : (int)avail;
    for (int i = 0; i < n; i++) out[i] = tokens[start + i];
    return n;
}

int tessera_ngram_propose(const int32_t* tokens, int64_t len, int min_n, int max_n, int k, int32_t* out) {
    int32_t* fail = malloc(sizeof(int32_t) * (size_t)max_n);
    if (!fail) return -1;
    int n = propose_one(tokens, len, min_n, max_n, k, fail, out);
    free(fail);
    return n;
}

/* Request i: tokens[i * stride : i * stride + lens[i]], k[i] tokens at most, written to
 * out[i * out_stride :], their number to counts[i]. Returns 0, or -1 when out of memory. */
int tessera_ngram_propose_batch(const int32_t* tokens, int64_t stride, const int64_t* lens, int64_t n_req,
                                int min_n, int max_n, const int32_t* k, int32_t* out, int64_t out_stride,
                                int32_t* counts) {
    int32_t* fail = malloc(sizeof(int32_t) * (size_t)max_n);
    if (!fail) return -1;
    for (int64_t i = 0; i < n_req; i++)
        counts[i] = propose_one(tokens + i * stride, lens[i], min_n, max_n, k[i], fail, out + i * out_stride);
    free(fail);
    return 0;
}
