/* zipfmt.h: the zip format's fixed numbers (signatures, header sizes, flags,
 * the zip64 extra id), shared by the zip reader and writer. */
#ifndef MLU_ZIPFMT_H
#define MLU_ZIPFMT_H

#define MLU_ZIP_LFH_SIG 0x04034b50u     /* local file header */
#define MLU_ZIP_CDH_SIG 0x02014b50u     /* central directory header */
#define MLU_ZIP_DD_SIG 0x08074b50u      /* data descriptor */
#define MLU_ZIP_EOCD64_SIG 0x06064b50u  /* zip64 end of central directory */
#define MLU_ZIP_LOC64_SIG 0x07064b50u   /* zip64 end locator */
#define MLU_ZIP_EOCD_SIG 0x06054b50u    /* end of central directory */

#define MLU_ZIP_LFH_SIZE 30u            /* fixed part of a local header */
#define MLU_ZIP_CDH_SIZE 46u            /* fixed part of a central header */
#define MLU_ZIP_DD_SIZE 16u             /* data descriptor with 32-bit sizes */
#define MLU_ZIP_DD64_SIZE 24u           /* data descriptor with 64-bit sizes */
#define MLU_ZIP_EOCD64_SIZE 56u
#define MLU_ZIP_LOC64_SIZE 20u
#define MLU_ZIP_EOCD_SIZE 22u
#define MLU_ZIP_EXTRA_HEAD 4u           /* id + length of an extra field */
#define MLU_ZIP64_EXTRA_ID 0x0001u

#define MLU_ZIP_FLAG_ENCRYPTED 0x0001u
#define MLU_ZIP_FLAG_DESCRIPTOR 0x0008u
#define MLU_ZIP_FLAG_STRONG_ENCRYPTION 0x0040u
#define MLU_ZIP_FLAG_MASKED_HEADER 0x2000u
#define MLU_ZIP_FLAG_UTF8 0x0800u

#endif
