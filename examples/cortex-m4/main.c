/* Example firmware: run an exported network on an embedded input and print the outputs.
 *
 * Build (see Makefile): the exported NET.c and NET.h, a header INPUT_HEADER holding
 *   static const float net_input[INPUT_SIZE] = {...};
 * and this file, with -DNET_HEADER='"NET.h"' -DINFER=NET_infer and the NET_ size macros
 * passed as INPUT_SIZE, OUTPUT_SIZE and ARENA_BYTES.  With -DNET_INT8 (make INT8=1) the
 * network is an int8 export: INFER is NET_infer_int8 and net_input is int8_t.  Prints, over
 * semihosting:
 *   output I 0xBITS   the float32 bits of each output (exact, for the comparison with the host)
 *   output I Q        int8 builds: each int8 output
 *   stack BYTES       the most stack INFER used (the stack is painted below the stack pointer first)
 *   ticks N           SysTick ticks of one inference at the 25 MHz processor clock; under
 *                     qemu -icount shift=0 one tick is 40 instructions
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include NET_HEADER
#ifdef NET_INT8
typedef int8_t elem_t;
#else
typedef float elem_t;
#endif
#include INPUT_HEADER /* static const elem_t net_input[INPUT_SIZE] */

#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)
#define SYST_RELOAD 0xFFFFFFu /* the 24-bit counter's largest start value */
#define PAINT 0xDEADBEEFu
#define PAINT_WORDS 4096 /* 16 KB of stack below the caller's */

extern volatile uint32_t systick_wraps;

static float arena[(ARENA_BYTES + sizeof(float) - 1) / sizeof(float) + 1] __attribute__((aligned(16)));
static elem_t output[OUTPUT_SIZE];

/* paint the stack below the stack pointer, run INFER, return how deep it wrote */
static __attribute__((noinline)) uint32_t stack_used(void)
{
    uint32_t *sp;
    __asm volatile("mov %0, sp" : "=r"(sp));
    for (int i = 1; i <= PAINT_WORDS; i++)
        sp[-i] = PAINT;
    INFER(net_input, output, arena);
    int deepest = 0;
    for (int i = 1; i <= PAINT_WORDS; i++)
        if (sp[-i] != PAINT)
            deepest = i;
    return (uint32_t)deepest * 4;
}

int main(void)
{
    const uint32_t stack = stack_used();
    SYST_RVR = SYST_RELOAD;
    SYST_CVR = 0;
    systick_wraps = 0;
    SYST_CSR = 7; /* processor clock, interrupt on wrap, enabled */
    while (SYST_CVR == 0) {
        /* until the counter has loaded SYST_RELOAD */
    }
    systick_wraps = 0;
    const uint32_t start = SYST_CVR;
    const int status = INFER(net_input, output, arena);
    const uint32_t end = SYST_CVR, wraps = systick_wraps;
    SYST_CSR = 0;
    const uint64_t ticks = (uint64_t)wraps * (SYST_RELOAD + 1) + start - end;
    printf("status %d\n", status);
    for (int i = 0; i < OUTPUT_SIZE; i++) {
#ifdef NET_INT8
        printf("output %d %d\n", i, (int)output[i]);
        continue;
#endif
        uint32_t bits;
        memcpy(&bits, &output[i], sizeof bits);
        printf("output %d 0x%08lx\n", i, (unsigned long)bits);
    }
    printf("stack %lu\n", (unsigned long)stack);
    printf("ticks %lu\n", (unsigned long)ticks); /* < 2^32 ticks: 171 s at 25 MHz */
    return status;
}
