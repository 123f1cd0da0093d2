/*
 * hsmshim: a PKCS#11 module for tests that forwards every call to a real module (SoftHSM) and
 * injects the faults and behaviours a real SoftHSM cannot produce. Built by the kms/pkcs11 tests
 * (shim_test.go) with the system C compiler; never part of Keyward.
 *
 * Environment, read when the module is loaded:
 *   HSMSHIM_MODULE   the real module to forward to (required)
 *   HSMSHIM_HANG     a file: while it exists and names a hooked function (one name per line), the
 *                    first call of that function to arrive hangs until the file is removed or no
 *                    longer names it; other calls pass (one hung call at a time, like one session
 *                    stuck on a dead connection)
 *   HSMSHIM_FAIL     a file: while it exists, hooked functions it names return CKR_DEVICE_ERROR
 *   HSMSHIM_OWN_IV   if set: C_EncryptInit with CKM_AES_GCM writes the module's own IV into the
 *                    caller's CK_GCM_PARAMS.pIv and encrypts under it, as HSMs that generate the
 *                    GCM IV themselves do (the caller must read it back)
 */
#define CK_PTR *
#define CK_DEFINE_FUNCTION(returnType, name) returnType name
#define CK_DECLARE_FUNCTION(returnType, name) returnType name
#define CK_DECLARE_FUNCTION_POINTER(returnType, name) returnType (* name)
#define CK_CALLBACK_FUNCTION(returnType, name) returnType (* name)
#ifndef NULL_PTR
#define NULL_PTR 0
#endif
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "pkcs11.h"

static void *real_handle;
static CK_FUNCTION_LIST_PTR real;
static CK_FUNCTION_LIST shim;
static const char *hang_file, *fail_file;
static int own_iv;
static int hanging;
static unsigned long iv_counter;

/* names reports whether file exists and holds the line fn. */
static int names(const char *file, const char *fn) {
	if (!file) return 0;
	FILE *f = fopen(file, "r");
	if (!f) return 0;
	char line[128];
	int found = 0;
	while (!found && fgets(line, sizeof line, f)) {
		line[strcspn(line, "\r\n")] = 0;
		found = strcmp(line, fn) == 0;
	}
	fclose(f);
	return found;
}

/* fault hangs or fails a hooked call as the control files say. */
static CK_RV fault(const char *fn) {
	if (names(hang_file, fn) && __sync_bool_compare_and_swap(&hanging, 0, 1)) {
		while (names(hang_file, fn)) usleep(5000);
		__sync_lock_release(&hanging);
	}
	return names(fail_file, fn) ? CKR_DEVICE_ERROR : CKR_OK;
}

#define HOOK(fn, params, args) \
	static CK_RV shim_##fn params { \
		CK_RV rv = fault(#fn); \
		if (rv != CKR_OK) return rv; \
		return real->fn args; \
	}

HOOK(C_Login, (CK_SESSION_HANDLE s, CK_USER_TYPE u, CK_UTF8CHAR_PTR pin, CK_ULONG n), (s, u, pin, n))
HOOK(C_OpenSession, (CK_SLOT_ID slot, CK_FLAGS fl, CK_VOID_PTR app, CK_NOTIFY cb, CK_SESSION_HANDLE_PTR s), (slot, fl, app, cb, s))
HOOK(C_GetTokenInfo, (CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info), (slot, info))
HOOK(C_FindObjectsInit, (CK_SESSION_HANDLE s, CK_ATTRIBUTE_PTR t, CK_ULONG n), (s, t, n))
HOOK(C_Encrypt, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out, CK_ULONG_PTR outn), (s, in, n, out, outn))
HOOK(C_Decrypt, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out, CK_ULONG_PTR outn), (s, in, n, out, outn))

static CK_RV shim_C_EncryptInit(CK_SESSION_HANDLE s, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k) {
	CK_RV rv = fault("C_EncryptInit");
	if (rv != CKR_OK) return rv;
	if (own_iv && m && m->mechanism == CKM_AES_GCM && m->pParameter) {
		CK_GCM_PARAMS *p = (CK_GCM_PARAMS *)m->pParameter;
		unsigned long c = __sync_add_and_fetch(&iv_counter, 1);
		for (CK_ULONG i = 0; p->pIv && i < p->ulIvLen; i++)
			p->pIv[i] = (CK_BYTE)(0xA5 ^ (c >> (8 * (i % sizeof c))) ^ i);
	}
	return real->C_EncryptInit(s, m, k);
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out) {
	if (!real) {
		const char *module = getenv("HSMSHIM_MODULE");
		void *h = real_handle = module ? dlopen(module, RTLD_NOW | RTLD_LOCAL) : NULL;
		CK_C_GetFunctionList get = h ? (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList") : NULL;
		if (!get || get(&real) != CKR_OK) return CKR_GENERAL_ERROR;
		hang_file = getenv("HSMSHIM_HANG");
		fail_file = getenv("HSMSHIM_FAIL");
		own_iv = getenv("HSMSHIM_OWN_IV") != NULL;
		shim = *real;
		shim.C_Login = shim_C_Login;
		shim.C_OpenSession = shim_C_OpenSession;
		shim.C_GetTokenInfo = shim_C_GetTokenInfo;
		shim.C_FindObjectsInit = shim_C_FindObjectsInit;
		shim.C_Encrypt = shim_C_Encrypt;
		shim.C_Decrypt = shim_C_Decrypt;
		shim.C_EncryptInit = shim_C_EncryptInit;
	}
	*out = &shim;
	return CKR_OK;
}

/* Unload the real module with the shim, as a client unloading the real module would: SoftHSM reads
 * SOFTHSM2_CONF once per load, and the next test has its own token. */
__attribute__((destructor)) static void unload(void) {
	if (real_handle) dlclose(real_handle);
}
