/* Opening a userfaultfd, shared by dirty tracking (source) and post-copy (destination). */
#include "uffd.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static int uffd_open(void)
{
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	int err, dev;

	if (fd >= 0)
		return fd;
	/* vm.unprivileged_userfaultfd=0 refuses the syscall; the device node may not. */
	err = errno;
	dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev < 0)
		return -err;
	fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
	err = errno;
	close(dev);
	return fd >= 0 ? fd : -err;
}

int uffd_new(uint64_t features, uint64_t *supported)
{
	struct uffdio_api api = {.api = UFFD_API, .features = features};
	int fd = uffd_open(), rc;

	if (fd < 0)
		return fd;
	if (ioctl(fd, UFFDIO_API, &api) < 0) {
		rc = -errno;
		close(fd);
		return rc;
	}
	if (supported)
		*supported = api.features;
	return fd;
}
