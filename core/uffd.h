#ifndef HYMIG_CORE_UFFD_H
#define HYMIG_CORE_UFFD_H

#include <stdint.h>

/* Opens a non-blocking userfaultfd (the syscall, else /dev/userfaultfd) and enables
 * features. *supported (if not NULL) gets what the kernel offers. A uffd accepts one
 * UFFDIO_API call, so every attempt takes a new fd. Returns the fd or a negative errno. */
int uffd_new(uint64_t features, uint64_t *supported);

#endif
