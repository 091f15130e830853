/* Start-up code for a Cortex-M4F under QEMU (mps2-an386): the vector table, the reset
 * handler (copy .data, clear .bss, enable the FPU, start newlib's semihosting I/O, call
 * main) and a SysTick handler that counts the timer's wrap-arounds. */
#include <stdint.h>

extern uint32_t __data_load, __data_start, __data_end, __bss_start__, __bss_end__, __stack_top;
extern int main(void);
extern void initialise_monitor_handles(void); /* newlib's rdimon: semihosting stdio */
extern void __libc_init_array(void);
extern void exit(int);

volatile uint32_t systick_wraps; /* read by main.c */

void reset_handler(void);
void default_handler(void);
void systick_handler(void);
void _init(void);
void _fini(void);

/* what crti.o/crtn.o would give __libc_init_array and exit (-nostartfiles): nothing to do */
void _init(void)
{
}

void _fini(void)
{
}

void default_handler(void)
{
    for (;;) {
    }
}

void systick_handler(void)
{
    systick_wraps++;
}

__attribute__((section(".vectors"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))&__stack_top, /* initial stack pointer */
    reset_handler,
    default_handler, /* NMI */
    default_handler, /* HardFault */
    default_handler, /* MemManage */
    default_handler, /* BusFault */
    default_handler, /* UsageFault */
    0, 0, 0, 0,
    default_handler, /* SVCall */
    default_handler, /* DebugMonitor */
    0,
    default_handler, /* PendSV */
    systick_handler, /* SysTick */
};

#define CPACR (*(volatile uint32_t *)0xE000ED88u)

void reset_handler(void)
{
    uint32_t *src = &__data_load;
    for (uint32_t *dst = &__data_start; dst < &__data_end;)
        *dst++ = *src++;
    for (uint32_t *dst = &__bss_start__; dst < &__bss_end__;)
        *dst++ = 0;
    CPACR |= 0xFu << 20; /* CP10 and CP11 (the FPU): full access */
    __asm volatile("dsb\n\tisb" ::: "memory");
    initialise_monitor_handles();
    __libc_init_array();
    exit(main());
}
