/*
 * A freestanding guest for husk-vmm's payload tests: a polling virtio-mmio (version 2) driver
 * for the vsock device at 0xd000_0000 that connects to host port 1234, sends "ping", waits for
 * "pong", prints it to COM1 and ends the VM with 'O' on the debug-exit port (0x501).
 *
 * Entered in 64-bit long mode at 0x1_0000 (see payload.ld) with the VMM's identity page tables
 * (first 4 GiB), its stack at 0x8ff0 and no interrupt controller: nothing here enables
 * interrupts, every wait polls a used ring and is bounded by the TSC. Each failure ends the VM
 * with its own byte (see `enum failure`) after a "FAIL" line on the serial port.
 *
 * References: virtio 1.2 §2.7 (split virtqueues), §3.1.1 (driver initialization), §4.2.2
 * (virtio-mmio registers), §5.10 (vsock); include/uapi/linux/virtio_vsock.h.
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

/* vsock (include/uapi/linux/virtio_vsock.h, vm_sockets.h). */
#define HOST_CID 2
#define TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define RXQ 0
#define TXQ 1
#define EVQ 2

/* The connection. */
#define GUEST_PORT 5000
#define HOST_PORT 1234
#define GUEST_BUF_ALLOC (64 * 1024)

/*
 * Guest-physical memory, all above the code (0x1_0000) and below 16 MiB: queue q's
 * descriptor table, available ring and used ring at RING_BASE + q * RING_STRIDE + 0, +0x1000
 * and +0x2000; RX buffers (header and payload in one descriptor, as Linux >= 6.2 posts them);
 * one TX header and one TX payload buffer, reused for every packet.
 */
#define QUEUE_SIZE 8
#define RING_BASE 0x100000UL
#define RING_STRIDE 0x4000UL
#define RX_BUF_BASE 0x200000UL
#define RX_BUF_SIZE 512
#define TX_HDR_ADDR 0x300000UL
#define TX_DATA_ADDR 0x301000UL

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

/* struct virtio_vsock_hdr: 44 bytes, packed, little-endian. */
struct vsock_hdr {
    u64 src_cid;
    u64 dst_cid;
    u32 src_port;
    u32 dst_port;
    u32 len;
    u16 type;
    u16 op;
    u32 flags;
    u32 buf_alloc;
    u32 fwd_cnt;
} __attribute__((packed));

_Static_assert(sizeof(struct vsock_hdr) == 44, "virtio_vsock_hdr is 44 bytes");

/* The driver's side of one split virtqueue. */
struct vq {
    u32 index;
    volatile struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
    u16 next_avail;
    u16 last_used;
};

/* Debug-exit bytes: 'O' on success, one of these on failure. */
enum failure {
    FAIL_DEVICE = 'M',   /* wrong magic, version or device id */
    FAIL_FEATURES = 'F', /* VERSION_1 not offered or FEATURES_OK refused */
    FAIL_QUEUE = 'Q',    /* a queue too small or already live */
    FAIL_STATUS = 'S',   /* DEVICE_NEEDS_RESET after DRIVER_OK */
    FAIL_TX = 'T',       /* a TX buffer was not used in time */
    FAIL_RX = 'W',       /* no RX packet in time */
    FAIL_USED = 'B',     /* a used element names a buffer we did not post, or a short length */
    FAIL_HEADER = 'H',   /* an RX packet for another connection */
    FAIL_RST = 'R',      /* the host reset the connection (nothing listening?) */
    FAIL_OP = 'U',       /* an RX packet with an op we did not expect */
    FAIL_DATA = 'D',     /* the host's data is not "pong" */
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

static void serial_write(const volatile u8 *s, u32 n)
{
    for (u32 i = 0; i < n; i++)
        outb(COM1, s[i]);
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

/* Waits for the next used element; returns its id and stores its length. */
static u16 vq_wait_used(struct vq *q, u32 *len, enum failure on_timeout)
{
    u64 deadline = rdtsc() + TIMEOUT_CYCLES;
    while (q->used->idx == q->last_used) {
        if (rdtsc() > deadline)
            fail(on_timeout);
        __asm__ volatile("pause");
    }
    barrier();
    volatile struct virtq_used_elem *elem = &q->used->ring[q->last_used % QUEUE_SIZE];
    u32 id = elem->id;
    *len = elem->len;
    q->last_used++;
    if (id >= QUEUE_SIZE)
        fail(FAIL_USED);
    return (u16)id;
}

static volatile struct vsock_hdr *rx_hdr(u16 id)
{
    return (volatile struct vsock_hdr *)(RX_BUF_BASE + (u64)id * RX_BUF_SIZE);
}

/* One device-writable descriptor per RX buffer, all posted. */
static void rx_fill(struct vq *rx)
{
    for (u16 i = 0; i < QUEUE_SIZE; i++) {
        rx->desc[i].addr = (u64)rx_hdr(i);
        rx->desc[i].len = RX_BUF_SIZE;
        rx->desc[i].flags = VIRTQ_DESC_F_WRITE;
        rx->desc[i].next = 0;
        vq_post(rx, i);
    }
}

/* Sends one packet on our connection (header in descriptor 0, payload in 1) and waits until
 * the device has used it, so that both buffers can be reused. */
static void tx_send(struct vq *tx, u64 cid, u16 op, const char *data, u32 len, u32 fwd_cnt)
{
    volatile struct vsock_hdr *hdr = (volatile struct vsock_hdr *)TX_HDR_ADDR;
    volatile u8 *payload = (volatile u8 *)TX_DATA_ADDR;
    hdr->src_cid = cid;
    hdr->dst_cid = HOST_CID;
    hdr->src_port = GUEST_PORT;
    hdr->dst_port = HOST_PORT;
    hdr->len = len;
    hdr->type = TYPE_STREAM;
    hdr->op = op;
    hdr->flags = 0;
    hdr->buf_alloc = GUEST_BUF_ALLOC;
    hdr->fwd_cnt = fwd_cnt;
    for (u32 i = 0; i < len; i++)
        payload[i] = (u8)data[i];

    tx->desc[0].addr = TX_HDR_ADDR;
    tx->desc[0].len = sizeof(struct vsock_hdr);
    tx->desc[0].flags = len ? VIRTQ_DESC_F_NEXT : 0;
    tx->desc[0].next = 1;
    tx->desc[1].addr = TX_DATA_ADDR;
    tx->desc[1].len = len;
    tx->desc[1].flags = 0;
    tx->desc[1].next = 0;
    vq_post(tx, 0);

    u32 used_len;
    if (vq_wait_used(tx, &used_len, FAIL_TX) != 0)
        fail(FAIL_USED);
}

/* Waits for the next RX packet of our connection that is not a credit update or request
 * (those are given back to the device at once); returns its buffer, still owned by us. */
static u16 rx_next(struct vq *rx, u64 cid)
{
    for (;;) {
        u32 used_len;
        u16 id = vq_wait_used(rx, &used_len, FAIL_RX);
        volatile struct vsock_hdr *hdr = rx_hdr(id);
        if (used_len < sizeof(struct vsock_hdr) || hdr->len > RX_BUF_SIZE - sizeof(*hdr) ||
            used_len < sizeof(struct vsock_hdr) + hdr->len)
            fail(FAIL_USED);
        if (hdr->src_cid != HOST_CID || hdr->dst_cid != cid || hdr->src_port != HOST_PORT ||
            hdr->dst_port != GUEST_PORT || hdr->type != TYPE_STREAM)
            fail(FAIL_HEADER);
        if (hdr->op == OP_RST)
            fail(FAIL_RST);
        if (hdr->op != OP_CREDIT_UPDATE && hdr->op != OP_CREDIT_REQUEST)
            return id;
        vq_post(rx, id);
    }
}

void guest_main(void)
{
    struct vq rx, tx, ev;

    device_begin();
    vq_setup(&rx, RXQ);
    vq_setup(&tx, TXQ);
    vq_setup(&ev, EVQ);
    mmio_write(REG_STATUS,
               STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    if (mmio_read(REG_STATUS) & STATUS_NEEDS_RESET)
        fail(FAIL_STATUS);
    /* The config space is read as 32-bit words; a CID is below 2^32 - 1. */
    u64 cid = mmio_read(REG_CONFIG) | ((u64)mmio_read(REG_CONFIG + 4) << 32);
    serial_puts("virtio-mmio vsock: driver ok\n");

    rx_fill(&rx);
    tx_send(&tx, cid, OP_REQUEST, 0, 0, 0);
    u16 id = rx_next(&rx, cid);
    if (rx_hdr(id)->op != OP_RESPONSE)
        fail(FAIL_OP);
    vq_post(&rx, id);
    serial_puts("vsock: connected to host port 1234\n");

    tx_send(&tx, cid, OP_RW, "ping", 4, 0);
    /* A stream: "pong" may come in more than one packet. */
    u8 got[4];
    u32 n = 0;
    while (n < sizeof(got)) {
        id = rx_next(&rx, cid);
        volatile struct vsock_hdr *hdr = rx_hdr(id);
        if (hdr->op != OP_RW)
            fail(FAIL_OP);
        const volatile u8 *data = (const volatile u8 *)(hdr + 1);
        for (u32 i = 0; i < hdr->len; i++) {
            if (n == sizeof(got))
                fail(FAIL_DATA);
            got[n++] = data[i];
        }
        vq_post(&rx, id);
    }
    if (got[0] != 'p' || got[1] != 'o' || got[2] != 'n' || got[3] != 'g')
        fail(FAIL_DATA);
    serial_puts("vsock: received ");
    serial_write(got, sizeof(got));
    serial_puts("\n");
    finish('O');
}

/* Entry: the stack (0x8ff0) is 16-byte aligned, so `call` leaves it as the ABI wants. */
__asm__(".section .text.entry, \"ax\"\n"
        ".global _start\n"
        "_start:\n"
        "    call guest_main\n"
        "1:  hlt\n"
        "    jmp 1b\n"
        ".previous\n");
