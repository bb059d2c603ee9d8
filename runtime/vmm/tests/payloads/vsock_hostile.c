/*
 * A hostile freestanding guest for husk-vmm's payload tests: it brings the vsock device at
 * 0xd000_0000 up like vsock_roundtrip.c, then corrupts the TX queue's available index (more
 * than the queue size ahead), expects DEVICE_NEEDS_RESET and a configuration-change interrupt,
 * writes DRIVER_OK again (the same status, then with DRIVER_OK cleared and set), expects the
 * status unchanged, kicks the broken queues a thousand times and powers off through the i8042
 * reset line, as Linux does with reboot=k. Each failure ends the VM with its own byte on the
 * debug-exit port after a "FAIL" line on the serial port.
 *
 * References: virtio 1.2 §2.1.2 (DEVICE_NEEDS_RESET), §2.7 (split virtqueues), §3.1.1,
 * §4.2.2 (virtio-mmio registers).
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/* Ports: COM1's transmit register and the VMM's debug exit (isa-debug-exit). */
#define COM1 0x3f8
#define DEBUG_EXIT 0x501

/* virtio-mmio registers (virtio 1.2 §4.2.2), offsets from the device window. */
#define MMIO_BASE 0xd0000000UL
#define REG_MAGIC 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_STATUS 0x070
#define REG_QUEUE_DESC_LOW 0x080
#define REG_QUEUE_DESC_HIGH 0x084
#define REG_QUEUE_DRIVER_LOW 0x090
#define REG_QUEUE_DRIVER_HIGH 0x094
#define REG_QUEUE_DEVICE_LOW 0x0a0
#define REG_QUEUE_DEVICE_HIGH 0x0a4
#define REG_CONFIG 0x100 /* struct virtio_vsock_config: le64 guest_cid */

#define MMIO_MAGIC 0x74726976 /* "virt" */
#define VIRTIO_ID_VSOCK 19

#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8
#define STATUS_NEEDS_RESET 64

/* VIRTIO_F_VERSION_1 is feature bit 32: bit 0 of the second feature word. */
#define VERSION_1_HIGH_BIT 1

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

/* vsock queues (virtio 1.2 §5.10.2). */
#define RXQ 0
#define TXQ 1
#define EVQ 2

/*
 * Guest-physical memory, all above the code (0x1_0000) and below 16 MiB: queue q's
 * descriptor table, available ring and used ring at RING_BASE + q * RING_STRIDE + 0, +0x1000
 * and +0x2000; RX buffers (header and payload in one descriptor, as Linux >= 6.2 posts them).
 */
#define QUEUE_SIZE 8
#define RING_BASE 0x100000UL
#define RING_STRIDE 0x4000UL
#define RX_BUF_BASE 0x200000UL
#define RX_BUF_SIZE 512

/* About a second at the TSC rates of current x86 CPUs (1-4 GHz); the host allows more. */
#define TIMEOUT_CYCLES 3000000000ULL

struct virtq_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct virtq_avail {
    u16 flags;
    u16 idx;
    u16 ring[QUEUE_SIZE];
    u16 used_event;
};

struct virtq_used_elem {
    u32 id;
    u32 len;
};

struct virtq_used {
    u16 flags;
    u16 idx;
    struct virtq_used_elem ring[QUEUE_SIZE];
    u16 avail_event;
};

/* The driver's side of one split virtqueue. */
struct vq {
    u32 index;
    volatile struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
    u16 next_avail;
    u16 last_used;
};

/* Debug-exit bytes on failure ('R' is never reached: the reset ends the VM first). */
enum failure {
    FAIL_DEVICE = 'M',   /* wrong magic, version or device id */
    FAIL_FEATURES = 'F', /* VERSION_1 not offered or FEATURES_OK refused */
    FAIL_QUEUE = 'Q',    /* a queue too small or already live */
    FAIL_STATUS = 'S',   /* not live after DRIVER_OK, or no DEVICE_NEEDS_RESET in time */
    FAIL_CONFIG = 'C',   /* DEVICE_NEEDS_RESET without a configuration change interrupt */
    FAIL_AGAIN = 'A',    /* DRIVER_OK written again changed the status */
};

/* The compiler may emit calls to these even when freestanding. */
void *memset(void *dst, int c, unsigned long n)
{
    volatile u8 *d = dst;
    while (n--)
        *d++ = (u8)c;
    return dst;
}

void *memcpy(void *dst, const void *src, unsigned long n)
{
    volatile u8 *d = dst;
    const u8 *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

static inline void outb(u16 port, u8 value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* Orders ring accesses for the compiler; x86 keeps stores in order and loads in order. */
static inline void barrier(void)
{
    __asm__ volatile("" : : : "memory");
}

static inline u32 mmio_read(u32 offset)
{
    return *(volatile u32 *)(MMIO_BASE + offset);
}

static inline void mmio_write(u32 offset, u32 value)
{
    *(volatile u32 *)(MMIO_BASE + offset) = value;
}

static void serial_puts(const char *s)
{
    while (*s)
        outb(COM1, (u8)*s++);
}

static __attribute__((noreturn)) void finish(u8 code)
{
    outb(DEBUG_EXIT, code);
    for (;;)
        __asm__ volatile("hlt");
}

static __attribute__((noreturn)) void fail(enum failure why)
{
    char line[] = "FAIL ?\n";
    line[5] = (char)why;
    serial_puts(line);
    finish((u8)why);
}

/* Reset, ACKNOWLEDGE|DRIVER, VERSION_1, FEATURES_OK (virtio 1.2 §3.1.1 steps 1-6). */
static void device_begin(void)
{
    if (mmio_read(REG_MAGIC) != MMIO_MAGIC || mmio_read(REG_VERSION) != 2 ||
        mmio_read(REG_DEVICE_ID) != VIRTIO_ID_VSOCK)
        fail(FAIL_DEVICE);
    mmio_write(REG_STATUS, 0);
    mmio_write(REG_STATUS, STATUS_ACKNOWLEDGE);
    mmio_write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    mmio_write(REG_DEVICE_FEATURES_SEL, 1);
    if (!(mmio_read(REG_DEVICE_FEATURES) & VERSION_1_HIGH_BIT))
        fail(FAIL_FEATURES);
    mmio_write(REG_DRIVER_FEATURES_SEL, 0);
    mmio_write(REG_DRIVER_FEATURES, 0);
    mmio_write(REG_DRIVER_FEATURES_SEL, 1);
    mmio_write(REG_DRIVER_FEATURES, VERSION_1_HIGH_BIT);
    mmio_write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(mmio_read(REG_STATUS) & STATUS_FEATURES_OK))
        fail(FAIL_FEATURES);
}

/* Lays out queue `index` in guest memory (zeroed: fresh RAM) and hands it to the device. */
static void vq_setup(struct vq *q, u32 index)
{
    u64 base = RING_BASE + index * RING_STRIDE;
    q->index = index;
    q->desc = (volatile struct virtq_desc *)base;
    q->avail = (volatile struct virtq_avail *)(base + 0x1000);
    q->used = (volatile struct virtq_used *)(base + 0x2000);
    q->next_avail = 0;
    q->last_used = 0;

    mmio_write(REG_QUEUE_SEL, index);
    if (mmio_read(REG_QUEUE_NUM_MAX) < QUEUE_SIZE || mmio_read(REG_QUEUE_READY) != 0)
        fail(FAIL_QUEUE);
    mmio_write(REG_QUEUE_NUM, QUEUE_SIZE);
    mmio_write(REG_QUEUE_DESC_LOW, (u32)base);
    mmio_write(REG_QUEUE_DESC_HIGH, (u32)(base >> 32));
    mmio_write(REG_QUEUE_DRIVER_LOW, (u32)(base + 0x1000));
    mmio_write(REG_QUEUE_DRIVER_HIGH, (u32)((base + 0x1000) >> 32));
    mmio_write(REG_QUEUE_DEVICE_LOW, (u32)(base + 0x2000));
    mmio_write(REG_QUEUE_DEVICE_HIGH, (u32)((base + 0x2000) >> 32));
    mmio_write(REG_QUEUE_READY, 1);
}

/* Makes the chain at `head` available and notifies the device. */
static void vq_post(struct vq *q, u16 head)
{
    q->avail->ring[q->next_avail % QUEUE_SIZE] = head;
    barrier();
    q->next_avail++;
    q->avail->idx = q->next_avail;
    barrier();
    mmio_write(REG_QUEUE_NOTIFY, q->index);
}


#define REG_INTERRUPT_STATUS 0x060
#define INT_CONFIG 2
#define STATUS_ALL (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
#define I8042_COMMAND 0x64
#define I8042_RESET 0xfe

/* Waits until the device sets DEVICE_NEEDS_RESET; bounded by the TSC. */
static void wait_needs_reset(void)
{
    u64 deadline = rdtsc() + TIMEOUT_CYCLES;
    while (!(mmio_read(REG_STATUS) & STATUS_NEEDS_RESET)) {
        if (rdtsc() > deadline)
            fail(FAIL_STATUS);
        __asm__ volatile("pause");
    }
}

void guest_main(void)
{
    struct vq rx, tx, ev;

    device_begin();
    vq_setup(&rx, RXQ);
    vq_setup(&tx, TXQ);
    vq_setup(&ev, EVQ);
    mmio_write(REG_STATUS, STATUS_ALL);
    if (mmio_read(REG_STATUS) != STATUS_ALL)
        fail(FAIL_STATUS);
    for (u16 i = 0; i < QUEUE_SIZE; i++) {
        rx.desc[i].addr = RX_BUF_BASE + (u64)i * RX_BUF_SIZE;
        rx.desc[i].len = RX_BUF_SIZE;
        rx.desc[i].flags = VIRTQ_DESC_F_WRITE;
        vq_post(&rx, i);
    }
    serial_puts("vsock: driver ok\n");

    /* Nothing was posted on TX: an index this far ahead can only be a corrupted ring. */
    tx.avail->idx = QUEUE_SIZE + 5;
    barrier();
    mmio_write(REG_QUEUE_NOTIFY, TXQ);
    wait_needs_reset();
    if (!(mmio_read(REG_INTERRUPT_STATUS) & INT_CONFIG))
        fail(FAIL_CONFIG);
    serial_puts("vsock: device needs reset\n");

    mmio_write(REG_STATUS, STATUS_ALL);
    mmio_write(REG_STATUS, STATUS_ALL & ~STATUS_DRIVER_OK);
    mmio_write(REG_STATUS, STATUS_ALL);
    if (mmio_read(REG_STATUS) != (STATUS_ALL | STATUS_NEEDS_RESET))
        fail(FAIL_AGAIN);
    for (int i = 0; i < 1000; i++) {
        mmio_write(REG_QUEUE_NOTIFY, TXQ);
        mmio_write(REG_QUEUE_NOTIFY, RXQ);
    }
    serial_puts("vsock: driver ok twice ignored\n");

    outb(I8042_COMMAND, I8042_RESET);
    finish('R');
}

/* Entry: the stack (0x8ff0) is 16-byte aligned, so `call` leaves it as the ABI wants. */
__asm__(".section .text.entry, \"ax\"\n"
        ".global _start\n"
        "_start:\n"
        "    call guest_main\n"
        "1:  hlt\n"
        "    jmp 1b\n"
        ".previous\n");
