// vcsim-lab: govmomi 0.24 (Debian golang-github-vmware-govmomi-dev) VPX simulator
// plus the vSphere methods a VM-export project needs and vcsim 0.24 lacks:
//
//	VirtualMachine.QueryChangedDiskAreas  (CBT from per-snapshot block hashes of the -flat.vmdk)
//	VirtualMachine.ExportVm -> HttpNfcLease (device URLs serve the -flat.vmdk, Range ok)
//	OvfManager.CreateDescriptor             (minimal OVF)
//	VirtualMachine.CreateSnapshot_Task      (wrapped: records CBT state, sets backing.changeId)
//
// hypersdk additions (tests/vcsim is owned by hypersdk; /work/shared/vcsim is the origin):
//
//	-cbt-max-extents N (or $VCSIM_CBT_MAX_EXTENTS): QueryChangedDiskAreas returns at most N extents
//	                   per call and a shorter DiskChangeInfo.length, like vSphere does for large
//	                   disks, so a client's paging loop is exercised for real.
//	-tools-running, -quiesce-fault: VMware Tools reported running (so clients ask for quiesced
//	                   snapshots), and quiesced snapshots failing as they do with a broken VSS.
//	-vms N:            N VMs per host and per cluster (inventory scale tests).
//	-user/-pass (or $VCSIM_USERNAME/$VCSIM_PASSWORD): the only accepted login (vcsim's default
//	                   accepts any non-empty pair, so a wrong password could not be tested).
//	VMDK descriptors:  each VM disk's "<disk>.vmdk" gets a monolithicFlat/VMFS descriptor naming
//	                   its "-flat.vmdk" extent (vcsim leaves it empty), so a client can resolve the
//	                   extent file the way it must on real ESXi.
//
// -ext=session (default): wrappers live in each session's registry (dispatcher uses them,
//
//	simulator internals still see *simulator.VirtualMachine in Map).
//
// -ext=map:               wrappers replace the VMs in simulator.Map (shows what breaks).
// -ext=none:              plain vcsim.
package main

import (
	"bytes"
	"crypto/sha1"
	"crypto/tls"
	"flag"
	"fmt"
	"hash/crc64"
	"io"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const blockSize = 64 * 1024

// ---------- CBT state ----------

type blockMap struct {
	sums    []uint64
	nonzero []bool
}

var (
	quiesceFault  bool // -quiesce-fault: quiesced CreateSnapshot fails (ApplicationQuiesceFault)
	cbtMaxExtents int  // 0 = unlimited
	cbtMu         sync.Mutex
	cbtByID       = map[string]*blockMap{} // changeId -> block state at that point
	cbtSeq        = map[string]int{}       // vm/key -> last sequence number
	crcTable      = crc64.MakeTable(crc64.ECMA)
	leaseSeq      int64
)

func unwrapVM(o mo.Reference) *simulator.VirtualMachine {
	switch v := o.(type) {
	case *simulator.VirtualMachine:
		return v
	case *LabVM:
		return v.VirtualMachine
	}
	return nil
}

func diskCapacity(d *types.VirtualDisk) int64 {
	if d.CapacityInBytes > 0 {
		return d.CapacityInBytes
	}
	return d.CapacityInKB * 1024
}

// flatPath maps a disk backing "[ds] dir/disk1.vmdk" to the local file <ds.info.url>/dir/disk1-flat.vmdk
func flatPath(d *types.VirtualDisk) (string, types.BaseMethodFault) {
	b, ok := d.Backing.(types.BaseVirtualDeviceFileBackingInfo)
	if !ok {
		return "", &types.NotSupported{}
	}
	info := b.GetVirtualDeviceFileBackingInfo()
	var p object.DatastorePath
	if !p.FromString(info.FileName) {
		return "", &types.InvalidDatastorePath{DatastorePath: info.FileName}
	}
	for _, e := range simulator.Map.All("Datastore") {
		ds := e.(*simulator.Datastore)
		if ds.Name == p.Datastore {
			return filepath.Join(ds.Info.GetDatastoreInfo().Url, strings.Replace(p.Path, ".vmdk", "-flat.vmdk", 1)), nil
		}
	}
	return "", &types.InvalidDatastorePath{DatastorePath: info.FileName}
}

func scan(file string, capacity int64) (*blockMap, error) {
	n := int((capacity + blockSize - 1) / blockSize)
	bm := &blockMap{sums: make([]uint64, n), nonzero: make([]bool, n)}
	f, err := os.Open(file)
	if err != nil {
		if os.IsNotExist(err) {
			return bm, nil // all zero
		}
		return nil, err
	}
	defer f.Close()
	buf := make([]byte, blockSize)
	zero := make([]byte, blockSize)
	for i := 0; i < n; i++ {
		k, err := io.ReadFull(f, buf)
		if k == 0 {
			break
		}
		for j := k; j < blockSize; j++ {
			buf[j] = 0
		}
		if !bytes.Equal(buf, zero) {
			bm.nonzero[i] = true
			bm.sums[i] = crc64.Checksum(buf, crcTable)
		}
		if err != nil {
			break
		}
	}
	return bm, nil
}

func nextChangeID(vm *simulator.VirtualMachine, key int32) string {
	id := fmt.Sprintf("%s/%d", vm.Self.Value, key)
	cbtSeq[id]++
	h := sha1.Sum([]byte(vm.Config.Uuid + id))
	var parts []string
	for _, c := range h[:16] {
		parts = append(parts, fmt.Sprintf("%02x", c))
	}
	return fmt.Sprintf("52 %s/%d", strings.Join(parts[1:], " "), cbtSeq[id])
}

func cbtEnabled(c *types.VirtualMachineConfigInfo) bool {
	return c.ChangeTrackingEnabled != nil && *c.ChangeTrackingEnabled
}

// afterSnapshot: give the new snapshot its own copy of the device list, record a block map
// per disk and publish it as backing.changeId on the snapshot disk and the VM's live disk.
func afterSnapshot(vm *simulator.VirtualMachine) {
	if vm.Snapshot == nil || vm.Snapshot.CurrentSnapshot == nil || !cbtEnabled(vm.Config) {
		return
	}
	snap, ok := simulator.Map.Get(*vm.Snapshot.CurrentSnapshot).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return
	}
	cbtMu.Lock()
	defer cbtMu.Unlock()
	devs := make([]types.BaseVirtualDevice, len(snap.Config.Hardware.Device))
	for i, d := range snap.Config.Hardware.Device {
		devs[i] = d
		disk, ok := d.(*types.VirtualDisk)
		if !ok {
			continue
		}
		b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		file, fault := flatPath(disk)
		if fault != nil {
			continue
		}
		bm, err := scan(file, diskCapacity(disk))
		if err != nil {
			log.Printf("cbt scan %s: %s", file, err)
			continue
		}
		cid := nextChangeID(vm, disk.Key)
		cbtByID[cid] = bm
		cd, cb := *disk, *b
		cb.ChangeId = cid
		cd.Backing = &cb
		devs[i] = &cd
		b.ChangeId = cid // live disk (shared with the VM config)
	}
	snap.Config.Hardware.Device = devs
}

func queryChangedDiskAreas(vm *simulator.VirtualMachine, req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, types.BaseMethodFault) {
	devices := vm.Config.Hardware.Device
	var cur *blockMap
	if req.Snapshot != nil {
		snap, ok := simulator.Map.Get(*req.Snapshot).(*simulator.VirtualMachineSnapshot)
		if !ok || snap.Vm != vm.Self {
			return nil, &types.ManagedObjectNotFound{Obj: *req.Snapshot}
		}
		devices = snap.Config.Hardware.Device
	}
	if !cbtEnabled(vm.Config) {
		return nil, &types.FileFault{File: vm.Config.Files.VmPathName} // real vSphere: FileFault
	}
	var disk *types.VirtualDisk
	for _, d := range devices {
		if x, ok := d.(*types.VirtualDisk); ok && x.Key == req.DeviceKey {
			disk = x
		}
	}
	if disk == nil {
		return nil, &types.InvalidArgument{InvalidProperty: "deviceKey"}
	}
	capacity := diskCapacity(disk)
	if req.StartOffset < 0 || req.StartOffset > capacity {
		return nil, &types.InvalidArgument{InvalidProperty: "startOffset"}
	}
	cbtMu.Lock()
	defer cbtMu.Unlock()
	if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok && req.Snapshot != nil {
		cur = cbtByID[b.ChangeId]
	}
	if cur == nil { // no snapshot state: use the live file
		file, fault := flatPath(disk)
		if fault != nil {
			return nil, fault
		}
		var err error
		if cur, err = scan(file, capacity); err != nil {
			return nil, &types.FileFault{File: file}
		}
	}
	var base *blockMap
	if req.ChangeId != "*" {
		if base = cbtByID[req.ChangeId]; base == nil {
			return nil, &types.InvalidArgument{InvalidProperty: "changeId"}
		}
	}
	info := &types.DiskChangeInfo{StartOffset: req.StartOffset, Length: capacity - req.StartOffset}
	for i := range cur.sums {
		changed := cur.nonzero[i]
		if base != nil {
			changed = i >= len(base.sums) || base.sums[i] != cur.sums[i] || base.nonzero[i] != cur.nonzero[i]
		}
		start := int64(i) * blockSize
		if !changed || start+blockSize <= req.StartOffset {
			continue
		}
		length := int64(blockSize)
		if start+length > capacity {
			length = capacity - start
		}
		n := len(info.ChangedArea)
		if n > 0 && info.ChangedArea[n-1].Start+info.ChangedArea[n-1].Length == start {
			info.ChangedArea[n-1].Length += length
		} else {
			if cbtMaxExtents > 0 && n >= cbtMaxExtents {
				// page full: this call covers [StartOffset, start); the client asks again from there
				info.Length = start - req.StartOffset
				return info, nil
			}
			info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: start, Length: length})
		}
	}
	return info, nil
}

// ---------- VMDK descriptors ----------

// writeDescriptors gives every VM disk a real descriptor ("<disk>.vmdk") naming its flat extent,
// as ESXi keeps them, unless the file already has content.
func writeDescriptors() {
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm := e.(*simulator.VirtualMachine)
		for _, d := range vm.Config.Hardware.Device {
			disk, ok := d.(*types.VirtualDisk)
			if !ok {
				continue
			}
			flat, fault := flatPath(disk)
			if fault != nil {
				continue
			}
			desc := strings.Replace(flat, "-flat.vmdk", ".vmdk", 1)
			if st, err := os.Stat(desc); err == nil && st.Size() > 0 {
				continue
			}
			sectors := diskCapacity(disk) / 512
			cid := fmt.Sprintf("%08x", crc64.Checksum([]byte(vm.Config.Uuid+desc), crcTable)&0xffffffff)
			text := fmt.Sprintf("# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=%s\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n"+
				"# Extent description\nRW %d VMFS \"%s\"\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n"+
				"ddb.virtualHWVersion = \"13\"\nddb.geometry.cylinders = \"%d\"\nddb.geometry.heads = \"255\"\nddb.geometry.sectors = \"63\"\n",
				cid, sectors, filepath.Base(flat), sectors/(255*63))
			if err := os.MkdirAll(filepath.Dir(desc), 0o755); err != nil {
				log.Printf("descriptor %s: %s", desc, err)
				continue
			}
			if err := os.WriteFile(desc, []byte(text), 0o644); err != nil {
				log.Printf("descriptor %s: %s", desc, err)
			}
		}
	}
}

// ---------- VirtualMachine wrapper ----------

type LabVM struct {
	*simulator.VirtualMachine
}

// Get lets the PropertyCollector see the embedded VM (see simulator.getObject)
func (vm *LabVM) Get() mo.Reference { return vm.VirtualMachine }

func (vm *LabVM) QueryChangedDiskAreas(ctx *simulator.Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	body := new(methods.QueryChangedDiskAreasBody)
	res, fault := queryChangedDiskAreas(vm.VirtualMachine, req)
	if fault != nil {
		body.Fault_ = simulator.Fault("", fault)
		return body
	}
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: *res}
	return body
}

func (vm *LabVM) CreateSnapshotTask(req *types.CreateSnapshot_Task) soap.HasFault {
	if req.Quiesce && quiesceFault {
		task := simulator.CreateTask(vm.VirtualMachine, "createSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
			return nil, new(types.ApplicationQuiesceFault)
		})
		return &methods.CreateSnapshot_TaskBody{Res: &types.CreateSnapshot_TaskResponse{Returnval: task.Run()}}
	}
	res := vm.VirtualMachine.CreateSnapshotTask(req) // runs synchronously
	if vm.Snapshot != nil {
		rememberSnapshots(vm.Self, vm.Snapshot.RootSnapshotList)
	}
	recordSnapshotFile(vm.VirtualMachine)
	afterSnapshot(vm.VirtualMachine)
	return res
}

// vcsim 0.24 bug: layoutEx.snapshot[].dataKey goes stale when RefreshStorageInfo renumbers
// layoutEx.file, so removing a snapshot can delete disk1.vmdk or disk1-flat.vmdk.
// Remember each snapshot's .vmsn by name and re-point dataKey before removals.
var snapFiles sync.Map // snapshot ref -> "[ds] dir/vm-SnapshotN.vmsn"

func recordSnapshotFile(vm *simulator.VirtualMachine) {
	if vm.Snapshot == nil || vm.Snapshot.CurrentSnapshot == nil {
		return
	}
	cur := *vm.Snapshot.CurrentSnapshot
	for _, s := range vm.LayoutEx.Snapshot {
		for _, f := range vm.LayoutEx.File {
			if s.Key == cur && f.Key == s.DataKey {
				snapFiles.Store(cur, f.Name)
			}
		}
	}
}

func fixSnapshotLayout(vm *simulator.VirtualMachine) {
	for i, s := range vm.LayoutEx.Snapshot {
		vm.LayoutEx.Snapshot[i].DataKey = -1
		if name, ok := snapFiles.Load(s.Key); ok {
			for _, f := range vm.LayoutEx.File { // RefreshStorageInfo drops the dir part of names
				if path.Base(f.Name) == path.Base(name.(string)) {
					vm.LayoutEx.Snapshot[i].DataKey = f.Key
				}
			}
		}
	}
}

func removeSnapshotFile(ref types.ManagedObjectReference) {
	if name, ok := snapFiles.Load(ref); ok {
		var p object.DatastorePath
		p.FromString(name.(string))
		for _, e := range simulator.Map.All("Datastore") {
			if ds := e.(*simulator.Datastore); ds.Name == p.Datastore {
				_ = os.Remove(filepath.Join(ds.Info.GetDatastoreInfo().Url, p.Path))
			}
		}
		snapFiles.Delete(ref)
	}
}

func (vm *LabVM) RemoveAllSnapshotsTask(ctx *simulator.Context, req *types.RemoveAllSnapshots_Task) soap.HasFault {
	for _, s := range vm.LayoutEx.Snapshot {
		removeSnapshotFile(s.Key)
	}
	vm.LayoutEx.Snapshot = nil // inner code then deletes nothing by (stale) key
	return vm.VirtualMachine.RemoveAllSnapshotsTask(ctx, req)
}

func (vm *LabVM) ExportVm(ctx *simulator.Context, req *types.ExportVm) soap.HasFault {
	body := new(methods.ExportVmBody)
	if vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
		body.Fault_ = simulator.Fault("", &types.InvalidPowerState{
			RequestedState: types.VirtualMachinePowerStatePoweredOff, ExistingState: vm.Runtime.PowerState})
		return body
	}
	lease := &LabLease{files: map[string]string{}}
	lease.Self = types.ManagedObjectReference{Type: "HttpNfcLease", Value: fmt.Sprintf("lab-lease-%d", atomic.AddInt64(&leaseSeq, 1))}
	lease.State = types.HttpNfcLeaseStateReady
	info := &types.HttpNfcLeaseInfo{Lease: lease.Self, Entity: vm.Self, LeaseTimeout: 300}
	n := 0
	for _, d := range vm.Config.Hardware.Device {
		disk, ok := d.(*types.VirtualDisk)
		if !ok {
			continue
		}
		file, fault := flatPath(disk)
		if fault != nil {
			body.Fault_ = simulator.Fault("", fault)
			return body
		}
		st, _ := os.Stat(file)
		size := int64(0)
		if st != nil {
			size = st.Size()
		}
		name := fmt.Sprintf("disk-%d.vmdk", n)
		lease.files[name] = file
		key := fmt.Sprintf("/%s/VirtualLsiLogicController0:%d", vm.Self.Value, n)
		info.DeviceUrl = append(info.DeviceUrl, types.HttpNfcLeaseDeviceUrl{
			Key: key, ImportKey: key, Url: fmt.Sprintf("https://*/nfc-lab/%s/%s", lease.Self.Value, name),
			Disk: types.NewBool(true), TargetId: name, FileSize: size,
		})
		info.TotalDiskCapacityInKB += diskCapacity(disk) / 1024
		n++
	}
	lease.Info = info
	simulator.Map.Put(lease) // global: NFC handler and all sessions can see it
	body.Res = &types.ExportVmResponse{Returnval: lease.Self}
	return body
}

// ---------- HttpNfcLease ----------

type LabLease struct {
	mo.HttpNfcLease
	files map[string]string
}

func (l *LabLease) HttpNfcLeaseComplete(ctx *simulator.Context, req *types.HttpNfcLeaseComplete) soap.HasFault {
	simulator.Map.Update(l, []types.PropertyChange{{Name: "state", Val: types.HttpNfcLeaseStateDone}})
	return &methods.HttpNfcLeaseCompleteBody{Res: new(types.HttpNfcLeaseCompleteResponse)}
}

func (l *LabLease) HttpNfcLeaseAbort(ctx *simulator.Context, req *types.HttpNfcLeaseAbort) soap.HasFault {
	simulator.Map.Update(l, []types.PropertyChange{{Name: "state", Val: types.HttpNfcLeaseStateError}})
	return &methods.HttpNfcLeaseAbortBody{Res: new(types.HttpNfcLeaseAbortResponse)}
}

func (l *LabLease) HttpNfcLeaseProgress(ctx *simulator.Context, req *types.HttpNfcLeaseProgress) soap.HasFault {
	l.TransferProgress = req.Percent
	return &methods.HttpNfcLeaseProgressBody{Res: new(types.HttpNfcLeaseProgressResponse)}
}

func (l *LabLease) HttpNfcLeaseGetManifest(ctx *simulator.Context, req *types.HttpNfcLeaseGetManifest) soap.HasFault {
	res := new(types.HttpNfcLeaseGetManifestResponse)
	for _, u := range l.Info.DeviceUrl {
		f, err := os.Open(l.files[u.TargetId])
		h := sha1.New()
		var n int64
		if err == nil {
			n, _ = io.Copy(h, f)
			f.Close()
		}
		res.Returnval = append(res.Returnval, types.HttpNfcLeaseManifestEntry{
			Key: u.Key, Sha1: fmt.Sprintf("%x", h.Sum(nil)), Size: n, Disk: true})
	}
	return &methods.HttpNfcLeaseGetManifestBody{Res: res}
}

// GET /nfc-lab/<lease>/<disk-N.vmdk>: no session needed (token = lease id, like vSphere); Range supported
func serveNFC(w http.ResponseWriter, r *http.Request) {
	lid, name := path.Base(path.Dir(r.URL.Path)), path.Base(r.URL.Path)
	l, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "HttpNfcLease", Value: lid}).(*LabLease)
	if !ok || l.State != types.HttpNfcLeaseStateReady || l.files[name] == "" || r.Method != http.MethodGet && r.Method != http.MethodHead {
		http.NotFound(w, r)
		return
	}
	f, err := os.Open(l.files[name])
	if err != nil {
		http.NotFound(w, r)
		return
	}
	defer f.Close()
	st, _ := f.Stat()
	w.Header().Set("Content-Type", "application/octet-stream")
	http.ServeContent(w, r, name, st.ModTime(), f)
}

// ---------- OvfManager.CreateDescriptor ----------

type LabOvfManager struct {
	*simulator.OvfManager
}

func (m *LabOvfManager) Get() mo.Reference { return m.OvfManager }

func (m *LabOvfManager) CreateDescriptor(ctx *simulator.Context, req *types.CreateDescriptor) soap.HasFault {
	body := new(methods.CreateDescriptorBody)
	vm := unwrapVM(simulator.Map.Get(req.Obj))
	if vm == nil {
		body.Fault_ = simulator.Fault("", &types.ManagedObjectNotFound{Obj: req.Obj})
		return body
	}
	var refs, disks, items strings.Builder
	n := 0
	for _, d := range vm.Config.Hardware.Device {
		disk, ok := d.(*types.VirtualDisk)
		if !ok {
			continue
		}
		href, size := fmt.Sprintf("%s-disk-%d.vmdk", vm.Name, n), int64(0)
		for _, f := range req.Cdp.OvfFiles {
			if f.DeviceId == fmt.Sprintf("/%s/VirtualLsiLogicController0:%d", vm.Self.Value, n) {
				href, size = f.Path, f.Size
			}
		}
		fmt.Fprintf(&refs, `    <File ovf:href="%s" ovf:id="file%d" ovf:size="%d"/>`+"\n", href, n+1, size)
		fmt.Fprintf(&disks, `    <Disk ovf:capacity="%d" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk%d" ovf:fileRef="file%d" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>`+"\n", diskCapacity(disk), n+1, n+1)
		fmt.Fprintf(&items, `      <Item><rasd:AddressOnParent>%d</rasd:AddressOnParent><rasd:ElementName>Hard disk %d</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk%d</rasd:HostResource><rasd:InstanceID>%d</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType></Item>`+"\n", n, n+1, n+1, 10+n)
		n++
	}
	ovf := fmt.Sprintf(`<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
  <References>
%s  </References>
  <DiskSection><Info>Virtual disk information</Info>
%s  </DiskSection>
  <VirtualSystem ovf:id="%s">
    <Info>A virtual machine</Info><Name>%s</Name>
    <OperatingSystemSection ovf:id="1"><Info>OS</Info></OperatingSystemSection>
    <VirtualHardwareSection><Info>Virtual hardware requirements</Info>
      <System><vssd:ElementName>Virtual Hardware Family</vssd:ElementName><vssd:InstanceID>0</vssd:InstanceID><vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType></System>
      <Item><rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits><rasd:ElementName>%d virtual CPU(s)</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>%d</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ElementName>%dMB of memory</rasd:ElementName><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>%d</rasd:VirtualQuantity></Item>
%s    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
`, refs.String(), disks.String(), vm.Name, vm.Name, vm.Config.Hardware.NumCPU, vm.Config.Hardware.NumCPU,
		vm.Config.Hardware.MemoryMB, vm.Config.Hardware.MemoryMB, items.String())
	body.Res = &types.CreateDescriptorResponse{Returnval: types.OvfCreateDescriptorResult{OvfDescriptor: ovf}}
	return body
}

// ---------- per-session injection ----------

// LabPC replaces the PropertyCollector singleton. vcsim creates one per session with
// reflect.New(type of the singleton), so every session gets a LabPC. Before serving a
// request it puts LabVM wrappers into the caller's session registry, which the SOAP
// dispatcher consults before simulator.Map.
type LabPC struct {
	simulator.PropertyCollector
}

func inject(ctx *simulator.Context) {
	if ctx.Session == nil {
		return
	}
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm, ok := e.(*simulator.VirtualMachine)
		if !ok {
			continue
		}
		if w, ok := ctx.Session.Registry.Get(vm.Self).(*LabVM); !ok || w.VirtualMachine != vm {
			ctx.Session.Put(&LabVM{vm})
		}
		if vm.Snapshot != nil {
			injectSnapshots(ctx, vm.Snapshot.RootSnapshotList)
			rememberSnapshots(vm.Self, vm.Snapshot.RootSnapshotList)
		}
	}
}

func injectSnapshots(ctx *simulator.Context, tree []types.VirtualMachineSnapshotTree) {
	for _, t := range tree {
		if s, ok := simulator.Map.Get(t.Snapshot).(*simulator.VirtualMachineSnapshot); ok {
			if w, ok := ctx.Session.Registry.Get(t.Snapshot).(*LabSnapshot); !ok || w.VirtualMachineSnapshot != s {
				ctx.Session.Put(&LabSnapshot{s})
			}
		}
		injectSnapshots(ctx, t.ChildSnapshotList)
	}
}

// LabSnapshot: vcsim 0.24 sets Task.info.entity to the snapshot for Remove/RevertToSnapshot;
// TaskInfo.entity is a ManagedEntity, so pyvmomi 9 raises TypeError. vCenter uses the VM.
type LabSnapshot struct {
	*simulator.VirtualMachineSnapshot
}

func (s *LabSnapshot) Get() mo.Reference { return s.VirtualMachineSnapshot }

func fixTaskEntity(task types.ManagedObjectReference, vmRef types.ManagedObjectReference) {
	t, ok := simulator.Map.Get(task).(*simulator.Task)
	vm, ok2 := simulator.Map.Get(vmRef).(*simulator.VirtualMachine)
	if ok && ok2 {
		ref := vmRef
		t.Info.Entity = &ref
		t.Info.EntityName = vm.Name
	}
}

// snapVM remembers each snapshot's VM, so a task whose entity is a (maybe already removed)
// snapshot can be re-pointed at its VM when any session reads it (see fixTaskRead). Sessions that
// never read a property before RemoveSnapshot_Task use the plain vcsim snapshot, not LabSnapshot.
var snapVM sync.Map // snapshot ref -> VM ref

func rememberSnapshots(vm types.ManagedObjectReference, tree []types.VirtualMachineSnapshotTree) {
	for _, t := range tree {
		snapVM.Store(t.Snapshot, vm)
		rememberSnapshots(vm, t.ChildSnapshotList)
	}
}

func fixTaskRead(ref types.ManagedObjectReference) {
	if ref.Type != "Task" {
		return
	}
	t, ok := simulator.Map.Get(ref).(*simulator.Task)
	if !ok || t.Info.Entity == nil || t.Info.Entity.Type != "VirtualMachineSnapshot" {
		return
	}
	if vm, ok := snapVM.Load(*t.Info.Entity); ok {
		fixTaskEntity(ref, vm.(types.ManagedObjectReference))
	}
}

func fixTaskReads(specs []types.PropertyFilterSpec) {
	for _, spec := range specs {
		for _, o := range spec.ObjectSet {
			fixTaskRead(o.Obj)
		}
	}
}

func (s *LabSnapshot) RemoveSnapshotTask(ctx *simulator.Context, req *types.RemoveSnapshot_Task) soap.HasFault {
	vmRef := s.Vm
	if vm, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine); ok {
		fixSnapshotLayout(vm)
	}
	res := s.VirtualMachineSnapshot.RemoveSnapshotTask(ctx, req)
	if b, ok := res.(*methods.RemoveSnapshot_TaskBody); ok && b.Res != nil {
		fixTaskEntity(b.Res.Returnval, vmRef)
	}
	if simulator.Map.Get(req.This) == nil {
		removeSnapshotFile(req.This)
		if ctx.Session != nil {
			ctx.Session.Registry.Remove(req.This)
		}
	}
	return res
}

func (s *LabSnapshot) RevertToSnapshotTask(req *types.RevertToSnapshot_Task) soap.HasFault {
	res := s.VirtualMachineSnapshot.RevertToSnapshotTask(req)
	if b, ok := res.(*methods.RevertToSnapshot_TaskBody); ok && b.Res != nil {
		fixTaskEntity(b.Res.Returnval, s.Vm)
	}
	return res
}

// FetchResponse/FetchBody mirror vcsim's internal Fetch types (the type name becomes the XML element).
type FetchResponse struct {
	Returnval types.AnyType `xml:"returnval,omitempty,typeattr"`
}
type FetchBody struct {
	Res    *FetchResponse `xml:"FetchResponse,omitempty"`
	Fault_ *soap.Fault    `xml:"http://schemas.xmlsoap.org/soap/envelope/ Fault,omitempty"`
}

func (b *FetchBody) Fault() *soap.Fault { return b.Fault_ }

// Fetch is what pyvmomi >= 8 uses for every property accessor (vm.snapshot, lease.error, ...).
// vcsim 0.24 panics (index out of range, connection dropped) when the property is unset;
// vCenter returns an empty result, i.e. None in Python. req is *internal.Fetch (unimportable).
func (pc *LabPC) Fetch(ctx *simulator.Context, req interface{}) soap.HasFault {
	inject(ctx)
	rv := reflect.ValueOf(req).Elem()
	this := rv.FieldByName("This").Interface().(types.ManagedObjectReference)
	fixTaskRead(this)
	prop := rv.FieldByName("Prop").Interface().(string)
	if ctx.Map.Get(this) != nil && this.Type != "ServiceInstance" {
		res := pc.PropertyCollector.RetrievePropertiesEx(ctx, &types.RetrievePropertiesEx{
			SpecSet: []types.PropertyFilterSpec{{
				PropSet:   []types.PropertySpec{{Type: this.Type, PathSet: []string{prop}}},
				ObjectSet: []types.ObjectSpec{{Obj: this}},
			}}})
		if b, ok := res.(*methods.RetrievePropertiesExBody); ok && b.Res != nil && b.Res.Returnval != nil {
			if o := b.Res.Returnval.Objects; len(o) == 1 && len(o[0].PropSet) == 0 && len(o[0].MissingSet) == 0 {
				return &FetchBody{Res: &FetchResponse{}}
			}
		}
	}
	out := reflect.ValueOf(&pc.PropertyCollector).MethodByName("Fetch").Call(
		[]reflect.Value{reflect.ValueOf(ctx), reflect.ValueOf(req)})
	return out[0].Interface().(soap.HasFault)
}

func (pc *LabPC) RetrievePropertiesEx(ctx *simulator.Context, r *types.RetrievePropertiesEx) soap.HasFault {
	inject(ctx)
	fixTaskReads(r.SpecSet)
	return pc.PropertyCollector.RetrievePropertiesEx(ctx, r)
}

func (pc *LabPC) RetrieveProperties(ctx *simulator.Context, r *types.RetrieveProperties) soap.HasFault {
	inject(ctx)
	fixTaskReads(r.SpecSet)
	return pc.PropertyCollector.RetrieveProperties(ctx, r)
}

func (pc *LabPC) CreateFilter(ctx *simulator.Context, r *types.CreateFilter) soap.HasFault {
	inject(ctx)
	fixTaskReads([]types.PropertyFilterSpec{r.Spec})
	return pc.PropertyCollector.CreateFilter(ctx, r)
}

func (pc *LabPC) WaitForUpdatesEx(ctx *simulator.Context, r *types.WaitForUpdatesEx) soap.HasFault {
	inject(ctx)
	return pc.PropertyCollector.WaitForUpdatesEx(ctx, r)
}

func main() {
	listen := flag.String("l", "127.0.0.1:0", "listen address (keep it on loopback)")
	useTLS := flag.Bool("tls", true, "serve https (self-signed localhost cert)")
	ext := flag.String("ext", "session", "extension mode: session|map|none")
	flag.IntVar(&cbtMaxExtents, "cbt-max-extents", 0, "QueryChangedDiskAreas: max extents per call (0 = all; env VCSIM_CBT_MAX_EXTENTS)")
	toolsRunning := flag.Bool("tools-running", false, "report VMware Tools running in every VM (quiesced snapshots)")
	flag.BoolVar(&quiesceFault, "quiesce-fault", false, "quiesced snapshots fail with ApplicationQuiesceFault")
	user := flag.String("user", "user", "the one accepted user name (env VCSIM_USERNAME)")
	pass := flag.String("pass", "pass", "the one accepted password (env VCSIM_PASSWORD)")
	machines := flag.Int("vms", 0, "VMs per host and per cluster (vcsim default 2: 4 VMs in all)")
	flag.Parse()
	if v := os.Getenv("VCSIM_USERNAME"); v != "" {
		*user = v
	}
	if v := os.Getenv("VCSIM_PASSWORD"); v != "" {
		*pass = v
	}
	if v := os.Getenv("VCSIM_CBT_MAX_EXTENTS"); v != "" && cbtMaxExtents == 0 {
		fmt.Sscanf(v, "%d", &cbtMaxExtents)
	}

	model := simulator.VPX()
	if *machines > 0 {
		model.Machine = *machines
	}
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	// a non-default Userinfo makes vcsim check the login strictly
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *pass)}
	if *useTLS {
		model.Service.TLS = new(tls.Config)
	}
	model.Service.HandleFunc("/nfc-lab/", serveNFC)

	content := simulator.Map.Get(types.ManagedObjectReference{Type: "ServiceInstance", Value: "ServiceInstance"}).(*simulator.ServiceInstance).Content
	switch *ext {
	case "session":
		pc := &LabPC{}
		pc.Self = content.PropertyCollector
		simulator.Map.Put(pc)
	case "map":
		for _, e := range simulator.Map.All("VirtualMachine") {
			simulator.Map.Put(&LabVM{e.(*simulator.VirtualMachine)})
		}
	}
	if *ext != "none" {
		om := simulator.Map.Get(*content.OvfManager).(*simulator.OvfManager)
		simulator.Map.Put(&LabOvfManager{om})
	}

	if *ext != "none" {
		writeDescriptors()
	}
	if *toolsRunning {
		for _, e := range simulator.Map.All("VirtualMachine") {
			vm := e.(*simulator.VirtualMachine)
			vm.Guest.ToolsRunningStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
			vm.Guest.ToolsStatus = types.VirtualMachineToolsStatusToolsOk
		}
	}
	s := model.Service.NewServer()
	fmt.Printf("VCSIM_URL=%s\n", s.URL.String())
	for _, e := range simulator.Map.All("Datastore") {
		ds := e.(*simulator.Datastore)
		fmt.Printf("VCSIM_DATASTORE=%s=%s\n", ds.Name, ds.Info.GetDatastoreInfo().Url)
	}
	os.Stdout.Sync()

	c := make(chan os.Signal, 1)
	signal.Notify(c, os.Interrupt, syscall.SIGTERM)
	<-c
	s.Close()
	model.Remove() // deletes the govcsim-* temp dirs
}
