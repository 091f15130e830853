/* Test driver for an exported network (tests/test_export.py).
 *
 * Compiled together with NET.c, where the test passes
 *   -DNET_HEADER='"<name>.h"' -DINFER=<name>_infer -DNETU_INPUT_SIZE=<NAME>_INPUT_SIZE ...
 * (see the test), and -DELEM=int8_t for NAME_infer_int8.  Usage: driver INPUTS OUTPUTS N:
 * reads N samples of ELEM (float32 by default; INPUT_SIZE each) from INPUTS, runs INFER on each
 * with an arena from malloc filled with 0xff bytes (NaN as floats: a value read before it
 * was written shows up as a non-finite output), writes N * OUTPUT_SIZE values to OUTPUTS.
 * Exit status: 0 ok, 2 usage or I/O, 3 INFER did not return 0.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include NET_HEADER

#ifndef ELEM
#define ELEM float
#endif

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    const long n = atol(argv[3]);
    FILE *fi = fopen(argv[1], "rb");
    FILE *fo = fopen(argv[2], "wb");
    if (fi == NULL || fo == NULL || n <= 0)
        return 2;
    ELEM *x = malloc(sizeof(ELEM) * INPUT_SIZE);
    ELEM *y = malloc(sizeof(ELEM) * OUTPUT_SIZE);
    /* malloc's blocks are 16-byte aligned on the hosts the tests run on */
    char *arena = malloc(ARENA_BYTES ? ARENA_BYTES : 1);
    if (x == NULL || y == NULL || arena == NULL)
        return 2;
    for (long i = 0; i < n; i++) {
        memset(arena, 0xff, ARENA_BYTES ? ARENA_BYTES : 1);
        if (fread(x, sizeof(ELEM), INPUT_SIZE, fi) != INPUT_SIZE)
            return 2;
        if (INFER(x, y, arena) != 0)
            return 3;
        if (fwrite(y, sizeof(ELEM), OUTPUT_SIZE, fo) != OUTPUT_SIZE)
            return 2;
    }
    /* the checks of the arguments */
    if (INFER(NULL, y, arena) != 1 || INFER(x, NULL, arena) != 1)
        return 3;
    if (ARENA_BYTES && (INFER(x, y, NULL) != 1 || INFER(x, y, arena + 4) != 2))
        return 3;
    free(x);
    free(y);
    free(arena);
    return fclose(fi) != 0 || fclose(fo) != 0 ? 2 : 0;
}
