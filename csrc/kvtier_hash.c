/* kvtier's chained block hash (docs/block-identity.md) over many blocks in one call.
 *
 * Same bytes as kvtier.blocks.hashing.hash_prompt for prompts without multimodal items:
 *   hash(i) = SHA-256("KVTB" 0x01 | parent | u32le(block_size) | tokens as u32le | tail)[0:16]
 * where tail is the pre-encoded extra-key fields (u32le count + fields): `tail_first` for block 0
 * (it may carry the cache salt), `tail_later` for every other block.
 * Built on first use by kvtier.blocks.fasthash with the system C compiler and OpenSSL's libcrypto.
 */
#include <stdint.h>
#include <string.h>
#include <openssl/sha.h>

int kvtier_hash_chain(const uint32_t *tokens, uint64_t blocks, uint32_t block_size, const uint8_t *parent,
                      const uint8_t *tail_first, uint64_t tail_first_len, const uint8_t *tail_later, uint64_t tail_later_len,
                      uint8_t *out) {
    uint8_t prev[16];
    uint8_t digest[SHA256_DIGEST_LENGTH];
    uint8_t size_le[4] = {(uint8_t)block_size, (uint8_t)(block_size >> 8), (uint8_t)(block_size >> 16), (uint8_t)(block_size >> 24)};
    static const uint8_t magic[5] = {'K', 'V', 'T', 'B', 1};
    memcpy(prev, parent, 16);
    for (uint64_t i = 0; i < blocks; i++) {
        SHA256_CTX ctx;
        if (!SHA256_Init(&ctx)) return -1;
        SHA256_Update(&ctx, magic, sizeof magic);
        SHA256_Update(&ctx, prev, 16);
        SHA256_Update(&ctx, size_le, 4);
        SHA256_Update(&ctx, tokens + i * block_size, (size_t)block_size * 4); /* little-endian hosts only */
        if (i == 0) SHA256_Update(&ctx, tail_first, tail_first_len);
        else SHA256_Update(&ctx, tail_later, tail_later_len);
        SHA256_Final(digest, &ctx);
        memcpy(prev, digest, 16);
        memcpy(out + i * 16, digest, 16);
    }
    return 0;
}
