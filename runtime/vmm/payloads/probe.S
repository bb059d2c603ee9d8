/*
 * The KVM capability probe: a tiny 64-bit guest that does what a Linux guest needs and the
 * restricted nested KVM of some hosts (PVM) cannot: cmpxchg16b, xsave/xrstor, and an int3
 * delivered through an IDT. Entered in long mode by husk-vmm (its GDT: code 0x08, data 0x10;
 * identity-mapped first GiB). Before each stage it writes the stage's digit to COM1, so the
 * host knows how far it got; it ends by writing 'O' (all passed) or 'F' (a wrong result) to
 * the debug-exit port 0x501. Position-independent (RIP-relative), all in .text.
 */
    .code64
    .text
    .globl _start
_start:
    /* 1: cmpxchg16b */
    mov $0x3f8, %dx
    mov $'1', %al
    out %al, %dx
    lea cmpx(%rip), %rdi
    xor %eax, %eax
    xor %edx, %edx
    mov $1, %ebx
    xor %ecx, %ecx
    lock cmpxchg16b (%rdi)
    jnz fail
    cmpq $1, (%rdi)
    jne fail

    /* 2: xsave / xrstor (CR4.OSFXSR | CR4.OSXSAVE, XCR0 = x87 | SSE) */
    mov $0x3f8, %dx
    mov $'2', %al
    out %al, %dx
    mov %cr4, %rax
    or $((1 << 18) | (1 << 9)), %rax
    mov %rax, %cr4
    xor %ecx, %ecx
    mov $3, %eax
    xor %edx, %edx
    xsetbv
    lea xarea(%rip), %rdi
    mov $3, %eax
    xor %edx, %edx
    xsave (%rdi)
    xrstor (%rdi)

    /* 3: int3 through an interrupt gate for vector 3 */
    mov $0x3f8, %dx
    mov $'3', %al
    out %al, %dx
    lea handler(%rip), %rax
    lea idt(%rip), %rdi
    add $(3 * 16), %rdi
    mov %ax, (%rdi)
    movw $0x08, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    movl $0, 12(%rdi)
    lea idt(%rip), %rax
    mov %rax, idtr_base(%rip)
    lidt idtr(%rip)
    movb $0, hit(%rip)
    int3
    cmpb $1, hit(%rip)
    jne fail

    mov $0x501, %dx
    mov $'O', %al
    out %al, %dx
    hlt
fail:
    mov $0x501, %dx
    mov $'F', %al
    out %al, %dx
    hlt

handler:
    movb $1, hit(%rip)
    iretq

    .balign 16
cmpx:
    .quad 0, 0
    .balign 16
idtr:
    .word 4 * 16 - 1
idtr_base:
    .quad 0
    .balign 16
idt:
    .fill 4 * 16, 1, 0
hit:
    .byte 0
    .balign 64
xarea:
    .fill 4096, 1, 0
