// Prints the logits bitnet.cpp (microsoft/BitNet 4645960, llama.cpp fork
// Eddie-Wang1120/llama.cpp@406a5036, October-2024 llama.h API) computes for a list of token ids,
// one row per position, whitespace-separated floats. Adapted from tools/anchors/llama_logits.c
// (2025 API) to the fork's API: llama_load_model_from_file, llama_new_context_with_model,
// llama_n_vocab(model), llama_free_model. Token ids are taken as given.
//
//   [KV_F32=1] bitnet_cpp_logits MODEL.gguf N_THREADS ID [ID ...] > logits.txt
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include "ggml.h"

#include "llama.h"

// DUMP=1: print every graph node's name, shape, first values and rms of its first row to stderr
// (ggml's eval callback; the CPU backend's tensors are host memory).
static bool dump_cb(struct ggml_tensor *t, bool ask, void *ud) {
    (void)ud;
    if (ask) return true;
    if (t->type != GGML_TYPE_F32) {
        fprintf(stderr, "DUMP %-24s type %d ne %lld %lld %lld\n", t->name, (int)t->type,
                (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2]);
        return true;
    }
    // DUMP_ROW=r: row r (index along ne[1]) instead of row 0, where the tensor has one
    const char *rs = getenv("DUMP_ROW");
    int64_t r = rs ? atoll(rs) : 0;
    if (r >= t->ne[1]) r = 0;
    const float *d = (const float *)((const char *)t->data + r * t->nb[1]);
    double ss = 0;
    for (int64_t i = 0; i < t->ne[0]; i++) ss += (double)d[i] * d[i];
    fprintf(stderr, "DUMP %-24s ne %lld %lld %lld  rms0 %.9g  v %.9g %.9g %.9g %.9g\n", t->name,
            (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2], sqrt(ss / t->ne[0]),
            d[0], t->ne[0] > 1 ? d[1] : 0.f, t->ne[0] > 2 ? d[2] : 0.f, t->ne[0] > 3 ? d[3] : 0.f);
    return true;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf N_THREADS ID [ID ...]\n", argv[0]);
        return 2;
    }
    int nt = atoi(argv[2]);
    int n = argc - 3;
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_load_model_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n < 32 ? 32 : n;
    cp.n_batch = n;
    cp.n_ubatch = n;
    cp.n_threads = nt;
    cp.n_threads_batch = nt;
    // KV_F32=1: keep the KV cache in f32 (default f16), as our CPU backend does. The fork refuses a
    // non-f16 V cache without flash attention, so this also turns flash attention on (FLASH_ATTN=1
    // alone: flash attention with the default f16 cache).
    if (getenv("KV_F32")) {
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
        cp.flash_attn = true;
    }
    if (getenv("FLASH_ATTN")) cp.flash_attn = true;
    if (getenv("DUMP")) {
        cp.cb_eval = dump_cb;
        cp.cb_eval_user_data = NULL;
    }
    struct llama_context *ctx = llama_new_context_with_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }
    int n_vocab = llama_n_vocab(model);
    struct llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i] = (llama_token)atoi(argv[i + 3]);
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;  // every position's logits
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "llama_decode failed\n");
        return 1;
    }
    for (int i = 0; i < n; i++) {
        const float *row = llama_get_logits_ith(ctx, i);
        for (int j = 0; j < n_vocab; j++) {
            printf(j ? " %.9g" : "%.9g", row[j]);
        }
        printf("\n");
    }
    llama_batch_free(batch);
    llama_free(ctx);
    llama_free_model(model);
    llama_backend_free();
    return 0;
}
